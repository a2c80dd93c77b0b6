"""The FastAPI application: ``create_app(settings)``; the engine and adapters load in its lifespan.

    uvicorn --factory service.app:create_app      (or: gfn serve)
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service import errors, logs
from service.errors import responses
from service.auth import require_key
from service.deps import admit
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestContext
from service.routes import adapters, generate, health, infill, jobs, reason
from service.settings import Settings, unknown_variables
from service.state import ServiceState

DESCRIPTION = """Samples from GFlowNet-tuned LoRA adapters: infilling, reasoning with a calculator,
constrained generation. Each adapter serves the posterior it was trained to sample, with the prompt,
mask and length limits of its manifest. With an API key set, send it as `Authorization: Bearer <key>`
or `X-API-Key`; /health, /ready and /metrics are open."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logs.configure(settings.log_level)
    for warning in unknown_variables(os.environ):
        logging.getLogger("gfn.settings").warning(warning)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = await ServiceState.start(settings, metrics)
        try:
            yield
        finally:
            await app.state.service.stop()

    app = FastAPI(title="gfn-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    errors.install(app)
    # the OpenAPI page states what this deployment asks: the key and its 401 only where one is set
    keyed, refused = ([Depends(require_key)], (401,)) if settings.api_key is not None else ([], ())
    app.include_router(health.router)
    for router in (infill.router, reason.router, generate.router):
        app.include_router(router, dependencies=[*keyed, Depends(admit)],
                           responses=responses(*refused, 404, 413, 415, 429, 503, 504))
    app.include_router(adapters.router, dependencies=keyed, responses=responses(*refused))
    app.include_router(jobs.router, dependencies=keyed, responses=responses(*refused))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, metrics=metrics,  # outermost: sees every response, 413 included
                       paths=frozenset(route.path for route in app.routes))
    return app
