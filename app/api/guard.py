"""The HTTP front door (SPEC 4.8), as one ASGI middleware in front of every route:

1. ``Host`` must name this server (``allowed_hosts``; by default the bind address,
   ``localhost`` and the loopback literals), else ``421 invalid_host`` -- a page on a
   rebinding DNS name reaches nothing.
2. A present ``Origin`` must be the server's own (``scheme://Host``) or allow-listed
   (``allowed_origins``), else ``403 forbidden_origin`` -- another site's page cannot
   send requests, with or without a token.
3. A mutating request (any method but GET/HEAD/OPTIONS) must be ``Content-Type:
   application/json``, else ``415 unsupported_media_type`` -- an HTML form or a no-cors
   ``fetch`` cannot produce one.
4. With any credential configured, a POST must carry one and every read but the open
   paths one of scope ``read`` (``app.api.auth``) -- checked before the body is read;
   the credential found is ``request.state.principal``. ``/`` without one is the login
   page (``app.api.panel``).
5. A body over ``request_max_bytes`` is refused ``413 body_too_large``: at once from its
   ``Content-Length``, else while it is read (chunked), never buffered beyond the cap.

Every answer gets the security headers: a CSP without inline script or style,
``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``, ``nosniff`` and
``Referrer-Policy: no-referrer``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from anyio.to_thread import run_sync

from app.api import auth
from app.api.deps import check_token, configured_token
from app.errors import AuthError, AutonomyError
from app.ops import credentials
from app.settings import Settings
from app.storage.context import Context

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
# paths whose reads return payloads or results: they need the token when one is set
TOKEN_READS = frozenset({"/api/autonomy/tasks"})


def host_name(host: str) -> str:
    """``Host`` without its port, lower-cased (``[::1]:8000`` -> ``::1``)."""
    h = host.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def _is_loopback_literal(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(settings: Settings, host: str | None) -> bool:
    """True when ``host`` (a ``Host`` header) names this server."""
    if not host:
        return False
    name = host_name(host)
    allowed = settings.allowed_host_names
    if "*" in allowed:
        return True
    if allowed:
        return name in allowed
    return name in {"localhost", host_name(settings.api_host)} or _is_loopback_literal(name)


class Guard:
    """The middleware (see the module docstring). ``csp_for(path)`` may give a path its
    own CSP (the API docs page)."""

    def __init__(self, app: ASGIApp, settings: Settings,
                 csp_for: Callable[[str], str | None] | None = None,
                 ctx: Context | None = None) -> None:
        self.app = app
        self.settings = settings
        self.csp_for = csp_for or (lambda _: None)
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        csp = (self.csp_for(path) or CSP).encode()

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in (b"content-security-policy",
                                                b"x-frame-options")]
                message["headers"] = [*headers, (b"content-security-policy", csp),
                                      *SECURITY_HEADERS]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is None and self.ctx is not None:
            refusal = await self._authenticate(scope, self.ctx)
        if refusal is None:
            refusal = self._length(scope)
        if refusal is not None:
            await _answer(send_secured, *refusal)
            return
        method = scope.get("method", "GET")
        if method in SAFE_METHODS:
            await self.app(scope, receive, send_secured)
            return
        body = await self._read_body(scope, receive, send_secured)
        if body is None:
            return
        await self.app(scope, _replay(body, receive), send_secured)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, dict[str, str]] | None:
        s = self.settings
        headers = _headers(scope)
        host = headers.get("host")
        if not host_allowed(s, host):
            return (421, "invalid_host", f"this server does not answer to Host {host!r}; "
                    "set AUTONOMY_ALLOWED_HOSTS to serve it", {})
        origin = headers.get("origin")
        if origin is not None:
            own = f"{scope.get('scheme', 'http')}://{host}".lower()
            if origin.strip().rstrip("/").lower() not in (own, *s.allowed_origin_list):
                return (403, "forbidden_origin", f"requests from origin {origin!r} are not "
                        "allowed; set AUTONOMY_ALLOWED_ORIGINS to allow one", {})
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        if method not in SAFE_METHODS:
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return (415, "unsupported_media_type", "a request that changes something "
                        "must be 'Content-Type: application/json'", {})
        if self.ctx is None and configured_token(s) is not None and (
                method not in SAFE_METHODS or path in TOKEN_READS):
            try:  # a Guard without a context: the bootstrap token only
                check_token(s, headers.get("authorization"))
            except AuthError as e:
                extra = {"www-authenticate": "Bearer"} if e.http_status == 401 else {}
                return (e.http_status, e.code, e.message, extra)
        return None

    async def _authenticate(self, scope: Scope, ctx: Context
                            ) -> tuple[int, str, str, dict[str, str]] | None:
        """Find the request's credential (``request.state.principal``) and refuse what
        it may not reach; None to go on."""
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        state = scope.setdefault("state", {})
        state["principal"] = None
        if auth.is_open(ctx, path):
            return None
        headers = _headers(scope)
        secret = auth.presented(headers)
        try:  # the bootstrap token needs no I/O; anything else may ask the database
            principal = credentials.is_bootstrap(ctx, secret) if secret else None
            if principal is None:
                principal = await run_sync(auth.identify, ctx, secret)
            if principal is None:  # no credential configured: nothing is asked
                return None
        except AuthError as e:
            if method == "GET" and path == "/":
                state["login"] = e.message  # the panel answers its login page
                return None
            extra = {"www-authenticate": "Bearer"} if e.http_status == 401 else {}
            return (e.http_status, e.code, e.message, extra)
        except AutonomyError as e:
            return (e.http_status, e.code, e.message, {})
        if method in SAFE_METHODS and not principal.may_read():
            return (403, "forbidden_scope", f"credential {principal.name!r} "
                    f"({principal.scope}) may not read {path}", {})
        state["principal"] = principal
        return None

    def _length(self, scope: Scope) -> tuple[int, str, str, dict[str, str]] | None:
        s = self.settings
        headers = _headers(scope)
        if scope.get("method", "GET") not in SAFE_METHODS:
            length = headers.get("content-length")
            if length is not None:
                if not length.strip().isdigit():
                    return (400, "invalid_input", "Content-Length is not a number", {})
                if int(length) > s.request_max_bytes:
                    return (413, "body_too_large", f"the request body is {int(length)} "
                            f"bytes, over the {s.request_max_bytes} limit", {})
        return None

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 when it grows past the cap."""
        limit = self.settings.request_max_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _answer(send, 413, "body_too_large",
                              f"the request body is over the {limit} byte limit", {})
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        name = k.decode("latin-1").lower()
        if name not in out:  # the first of repeated headers
            out[name] = v.decode("latin-1")
    return out


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, code: str, message: str,
                  extra: dict[str, str]) -> None:
    body = json.dumps({"ok": False, "error": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode("latin-1", "replace")) for k, v in extra.items()]
    if status in (413, 421) or status >= 500:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
