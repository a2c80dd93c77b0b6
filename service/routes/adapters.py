from __future__ import annotations

from fastapi import APIRouter, Response

from adapters.store import format_ref
from service.deps import State
from service.errors import responses
from service.registry import Entry
from service.routes.strict import StrictRoute
from service.schemas import AdapterName, AdapterOut, AdaptersResponse, LoadRequest, Version

router = APIRouter(prefix="/adapters", tags=["adapters"], route_class=StrictRoute)


def _out(state: State, entry: Entry) -> AdapterOut:
    m = entry.manifest
    return AdapterOut(ref=m.ref, name=m.name, version=m.version, task=m.task, rank=m.lora.r, created_at=m.created_at,
                      routed=state.registry.routed(m.name) is entry, pinned=entry.pinned, retiring=entry.retiring,
                      in_flight=entry.in_flight)


@router.get("", response_model=AdaptersResponse)
async def list_adapters(state: State) -> AdaptersResponse:
    """The loaded adapter versions, which one each name routes to, and those refused."""
    entries = sorted(state.registry.entries.values(), key=lambda e: (e.manifest.name, e.manifest.version))
    return AdaptersResponse(loaded=[_out(state, e) for e in entries], refused=state.refused)


@router.post("", response_model=AdapterOut, status_code=201,
             responses={200: {"description": "loaded already"}, **responses(404, 409, 413, 415)})
async def load_adapter(body: LoadRequest, state: State, response: Response) -> AdapterOut:
    """Load a version from the store: checked (checksums, base model), warmed, then routed to if it
    is the newest loaded version of its name; older unpinned versions retire once idle. A version
    loaded already answers 200 (with its pin set, where `pin` is given)."""
    entry, added = await state.registry.load(body.name, body.version, body.pin)
    state.refused.pop(entry.manifest.ref, None)
    if not added:
        response.status_code = 200
    return _out(state, entry)


@router.delete("/{name}/{version}", responses=responses(404))
async def unload_adapter(name: AdapterName, version: Version, state: State) -> dict[str, str]:
    """Stop routing to a version and unload it once its in-flight requests have finished."""
    ref = format_ref(name, version)
    await state.registry.unload(ref)
    return {"unloaded": ref}
