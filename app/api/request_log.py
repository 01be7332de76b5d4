"""Every request gets an id, and one access line.

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, which runs the app in
another task): it takes the caller's ``X-Request-ID`` when it is a sane token (at most 64
of ``A-Za-z0-9._:-``) or makes one, binds it for the request (``app.logs.bound``: every line
logged while the request is served carries ``request_id``), answers it in the
``X-Request-ID`` header, and logs ``METHOD PATH STATUS`` with the duration on the
``app.api.access`` logger (uvicorn's own access log is off: it cannot carry the id).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs

access_log = logging.getLogger("app.api.access")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
HEADER = b"x-request-id"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's request id when it is a sane token, else a fresh one."""
    for k, v in headers:
        if k.lower() == HEADER:
            text = v.decode("latin-1")
            if _SANE_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


class RequestLog:
    """Request ids and access lines for an ASGI app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope.get("headers") or [])
        # for the handler of unexpected errors, which runs outside this middleware
        scope.setdefault("state", {})["request_id"] = rid
        started = time.monotonic()
        status: dict[str, Any] = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, rid.encode())]
            await send(message)

        with logs.bound(request_id=rid):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                ms = round((time.monotonic() - started) * 1000, 1)
                access_log.info("%s %s %s %s ms", scope.get("method"), scope.get("path"),
                                status["code"], ms,
                                extra={"method": scope.get("method"), "path": scope.get("path"),
                                       "status": status["code"], "duration_ms": ms})
