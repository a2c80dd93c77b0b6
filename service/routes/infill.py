from __future__ import annotations

from fastapi import APIRouter, Request

from service.deps import State, serve_samples
from service.routes.strict import StrictRoute
from service.schemas import InfillRequest, SamplesResponse

router = APIRouter(tags=["sampling"], route_class=StrictRoute)


@router.post("/infill", response_model=SamplesResponse)
async def infill(body: InfillRequest, request: Request, state: State) -> SamplesResponse:
    """Middles Z between a beginning X and an ending Y, sampled from p(Z | X, Y) ∝ p(X Z Y) by an
    infilling adapter; with `score`, also the base model's log p(Z Y | X) of each, read from the
    plain story "X Z Y" (a space before Y, as the infill task scores it)."""
    suffix = state.encode(" " + body.suffix)
    return await serve_samples(request, state, body, "infill", {"prefix": body.prefix, "suffix": body.suffix},
                               (lambda m, s: (state.encode_context(body.prefix, m), s.token_ids + suffix))
                               if body.score else None)
