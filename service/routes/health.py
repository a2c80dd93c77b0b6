from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import State
from service.errors import responses

router = APIRouter(tags=["operations"])


@router.get("/health", responses=responses(503))
@router.head("/health", include_in_schema=False)  # load balancers probe with HEAD too
async def health(state: State) -> Any:
    """Alive: the process answers and its engine runs; a crashed engine is a restart's to cure."""
    if not state.engine.alive:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "not ready; the body says why"}})
@router.head("/ready", include_in_schema=False)
async def ready(state: State) -> Any:
    """Ready to serve: engine up, start-up adapters loaded (or refused, listed), Redis reachable when configured."""
    report = await state.readiness()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus metrics (names in the style of vLLM's, prefix gfn:)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
