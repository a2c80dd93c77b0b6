"""The route class of every endpoint that reads a JSON body: a key given twice is refused.

Python's JSON reader keeps the last of repeated keys, so `{"task": "rng", "task": "infill"}`
queued an infill job; the body is read once more here, before FastAPI reads it, only to look
for repeats (a malformed body is left to FastAPI's own error).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from adapters.unique_json import DuplicateKey, unique_keys
from service.errors import invalid


class StrictRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            if "json" in request.headers.get("content-type", ""):
                try:
                    json.loads(await request.body(), object_pairs_hook=unique_keys)  # the body is kept for FastAPI
                except DuplicateKey as error:
                    raise invalid(error.key, f"{error.key!r} is given twice in one object: give each field once",
                                  error.value) from None
                except (ValueError, RecursionError):  # FastAPI's to report: malformed, not UTF-8, too deep
                    pass
            return await handler(request)

        return strict
