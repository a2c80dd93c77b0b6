"""The API key: with GFN_API_KEY set, every route but /health, /ready and /metrics needs it.

It is checked before anything about the request is answered, a malformed body included:
FastAPI reads the body before it runs a route's dependencies, so the handler of body errors
asks here first (errors.py), and a client without the key learns nothing of the API.
"""

from __future__ import annotations

import secrets

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the service's API key")
_bearer = HTTPBearer(auto_error=False, description="the service's API key as a bearer token")


async def key_refused(request: Request) -> HTTPException | None:
    """The 401 for a request without the service's key; None when no key is set or it is the right one."""
    expected = request.app.state.service.settings.api_key
    if expected is None:
        return None
    bearer = await _bearer(request)
    given = await _api_key(request) or (bearer.credentials if bearer is not None else "")
    if secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        return None
    return HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                         headers={"WWW-Authenticate": "Bearer"})


async def require_key(request: Request, _key: str | None = Security(_api_key), _token=Security(_bearer)) -> None:
    """The routes' dependency (its parameters put both ways of sending the key in the OpenAPI page)."""
    if (refused := await key_refused(request)) is not None:
        raise refused
