from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import State, serve_samples
from service.routes.strict import StrictRoute
from service.schemas import GenerateRequest, SamplesResponse

router = APIRouter(tags=["sampling"], route_class=StrictRoute)


@router.post("/generate", response_model=SamplesResponse)
async def generate(body: GenerateRequest, request: Request, state: State) -> SamplesResponse:
    """Constrained generation: text with the keywords and without the avoided words, sampled from
    p(Z | X) c(Z) by a constrained adapter. Any adapter whose prompt takes the fields given
    (e.g. `text` for continuation, none for random numbers) serves here too."""
    fields = {"keywords": None if body.keywords is None else ", ".join(body.keywords),
              "avoid": None if body.avoid is None else ", ".join(body.avoid),
              "text": body.text}
    words = {"keywords": body.keywords or [], "avoid": body.avoid or []}
    return await serve_samples(request, state, body, "constrained", fields, words=words)
