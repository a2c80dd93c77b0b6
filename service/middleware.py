"""ASGI middleware: request ids, access logs and request metrics; the body size cap.

Plain ASGI rather than BaseHTTPMiddleware, so that a handler can still wait for the client's
disconnect on ``receive`` (and abort its engine requests).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import CLIENT_CLOSED
from service.logs import request_id
from service.metrics import Metrics

log = logging.getLogger("gfn.service.access")
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestContext:
    """Gives every request an id (the client's X-Request-ID when it is sane), returns it in a
    header, logs one JSON line per request and counts it by endpoint, adapter and status. A
    request answered before routing (413) counts under its path when that is one of ``paths``."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str] = frozenset()):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_ID_RE.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        scope.setdefault("state", {})["started"] = started
        status, gone = 0, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, gone
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            try:
                await send(message)
            except Exception:
                gone = True  # the connection is closed
                raise

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if gone:  # a request pipelined behind another on a connection since closed: uvicorn does not tell it
                log.info("client went away before its answer", extra={"status": status})
            else:
                log.exception("request failed")
                if status:  # the response had started: nothing more can be sent
                    raise
                await _send_json(send_with_id, 500, {"detail": f"internal error; the service log has it under request id {rid}"})
        finally:
            status = CLIENT_CLOSED if gone or not status else status  # not status: it left while sending its body (BodyLimit)
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.paths else "other")
            adapter = scope["state"].get("adapter", "")
            self.metrics.e2e.labels(endpoint, adapter).observe(elapsed)
            self.metrics.requests.labels(endpoint, adapter, str(status)).inc()
            log.info("request", extra={"method": scope["method"], "path": scope["path"], "status": status,
                                       "ms": round(elapsed * 1000, 1), "adapter": adapter})
            request_id.reset(token)


class BodyLimit:
    """Answers 413 to a body over ``max_bytes`` (declared or streamed) before any handler reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # from here on: the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await _send_json(send, 413, {"detail": f"request body over {self.max_bytes} bytes (GFN_MAX_BODY_BYTES)"})


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
