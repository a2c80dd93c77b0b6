"""Errors of the service and the HTTP status each maps to.

Store errors (adapters.errors) keep their messages: they already name the adapter, the file
and what to do. Every response to a failure is JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adapters.errors import AdapterCorrupt, AdapterNotFound, BaseModelMismatch, InvalidAdapterName
from service.auth import key_refused
from service.engines.base import EngineStopped


ERRORS = {
    401: "missing or wrong API key",
    404: "adapter not loaded (or not stored)",
    409: "adapter refused: corrupt, trained on another base model, or beyond the engine's configuration",
    413: "request body over the cap",
    415: "the body was not sent as JSON (content-type application/json)",
    429: "too many requests in flight; retry after the Retry-After seconds",
    503: "the engine stopped: restart the service",
    504: "the request did not finish within the timeout",
}


def responses(*codes: int) -> dict[int | str, dict]:
    """The OpenAPI page's entries for these error statuses."""
    return {code: {"description": ERRORS[code]} for code in codes}


class AdapterRefused(Exception):
    """The engine cannot serve this adapter (rank or modules beyond its configuration, load failure)."""


class AdapterBusy(AdapterRefused):
    """Refused for now (the version is being unloaded, the engine holds its most adapters):
    the same load may succeed later."""


class AdapterUnavailable(Exception):
    """The adapter named in a request is not loaded (or is being unloaded)."""


class ClientDisconnected(Exception):
    """The client went away before its answer was ready (logged and counted as status 499)."""


CLIENT_CLOSED = 499
"""The status a request is counted under when its client went away before the answer (nginx's)."""


def invalid(field: str, message: str, value: Any = None) -> RequestValidationError:
    """A 422 naming a body field, in FastAPI's own format, for checks that need the settings or an adapter."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


_STATUS: dict[type[Exception], int] = {
    AdapterNotFound: 404,
    AdapterUnavailable: 404,
    InvalidAdapterName: 422,
    AdapterCorrupt: 409,
    BaseModelMismatch: 409,
    AdapterRefused: 409,
    EngineStopped: 503,
    TimeoutError: 504,
    ClientDisconnected: CLIENT_CLOSED,
}


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error may echo the client's input, and a lone surrogate
    in it (valid JSON, "\\ud800") cannot be encoded as UTF-8. A NaN or an infinity it echoes
    (Python's reader takes them) is written as a string: strict JSON has no such numbers."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_UNPARSED = "There was an error parsing the body"
"""FastAPI's 400 for a body its JSON reader cannot take: bytes that are not UTF-8, nesting too deep."""


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    for error, status in _STATUS.items():
        app.add_exception_handler(error, _handler(status))


async def _invalid(request: Request, error: RequestValidationError) -> ErrorResponse:
    """FastAPI's own 422 body, encoded safely; a 401 first to a client without the API key."""
    if (refused := await key_refused(request)) is not None:
        return ErrorResponse({"detail": refused.detail}, status_code=401, headers=refused.headers)
    sent = request.headers.get("content-type", "")
    if sent and "json" not in sent and any(e["loc"] == ("body",) for e in error.errors()):  # read as bytes, not JSON
        return ErrorResponse({"detail": f"content-type {sent!r}: send the body as JSON (application/json)"},
                             status_code=415)
    return ErrorResponse({"detail": jsonable_encoder(error.errors())}, status_code=422)


async def _http(request: Request, error: StarletteHTTPException) -> Response:
    """A body that is no JSON at all gets the 422 of one that is malformed; any other HTTP error, FastAPI's answer."""
    if error.status_code == 400 and error.detail == _UNPARSED:
        return await _invalid(request, RequestValidationError([{
            "type": "json_invalid", "loc": ("body",), "input": None,
            "msg": "the body is not JSON: its bytes are not UTF-8, or it nests too deep"}]))
    if error.status_code == 405:  # Starlette's Allow names the methods of the first route on the path only
        error.headers = {**(error.headers or {}), "Allow": ", ".join(_methods(request))}
    return await http_exception_handler(request, error)


def _methods(request: Request) -> list[str]:
    """Every method some route takes on this path."""
    on_path = (route for route in request.app.routes if route.matches(request.scope)[0] != Match.NONE)
    return sorted({method for route in on_path for method in getattr(route, "methods", None) or ()})


def _handler(status: int):
    async def handle(request: Request, error: Exception) -> ErrorResponse:
        return ErrorResponse({"detail": str(error)}, status_code=status)

    return handle
