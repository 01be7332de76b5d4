"""The FastAPI app: ``create_app(settings=None, ctx=None)``.

Every answer is JSON with ``ok`` (the panel's HTML pages aside). Errors are mapped here,
once: an ``AutonomyError`` answers its ``http_status`` and ``to_wire()``; a Redis or
database error that escaped the domain and means the server is unavailable (for Redis:
``app.storage.redis_errors``: down, stalled, OOM, READONLY, ...) is ``redis_unavailable`` /
``database_unavailable`` (503); FastAPI's own validation errors are ``invalid_input``
(400, never 422); an unknown path or method keeps its status with ``ok: false``; and
anything unexpected is a 500 ``internal_error`` whose details go to the log, never to
the client.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__
from app.api import panel, routes, schemas
from app.api.deps import SafeJSONResponse
from app.api.guard import Guard
from app.api.request_log import RequestLog
from app.errors import (
    AutonomyError,
    Conflict,
    DatabaseUnavailable,
    InvalidInput,
)
from app.settings import Settings
from app.storage.context import Context
from app.storage.redis_errors import is_unavailable  # layer: the one classification of
from app.storage.redis_errors import unavailable as redis_unavailable  # layer: Redis errors

log = logging.getLogger(__name__)
SWAGGER_CDN = "https://cdn.jsdelivr.net"

DESCRIPTION = """Run fleets of autonomous workers safely: lanes, leases, guarded claims,
a failure breaker and visible run-locks.

Every answer has `ok`. A refusal also has `error` (a stable code) and a human `message`,
with a 4xx status (503 when the database or Redis cannot be reached). Mutating actions
need a credential, `Authorization: Bearer <token>`, once the server has any
(`AUTONOMY_API_TOKEN`, or one minted by `autonomy token create`); then reads that show
tasks need one of scope `read` too. See docs/security.md."""

# the operations' groups in the OpenAPI document (each route names its own, with an
# explicit operation id: what generated clients name their functions and modules by)
TAGS = [
    {"name": "actions", "description": "`POST /api/autonomy`: every action."},
    {"name": "reads", "description": "The status payload and the task list."},
    {"name": "metrics", "description": "Prometheus text format."},
    {"name": "probes", "description": "Liveness and readiness for containers."},
]


def create_app(settings: Settings | None = None, ctx: Context | None = None) -> FastAPI:
    """The API and the control panel over ``ctx`` (built from ``settings``, or from the
    environment, when not given; closed on shutdown only when built here)."""
    owned = ctx is None
    context = ctx if ctx is not None else Context.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        turns = getattr(app.state, "long_poll_turns", None)
        if turns is not None:  # its feeder threads stop
            turns.close()
        if owned:
            context.close()

    app = FastAPI(title="autonomy", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_tags=TAGS,
                  default_response_class=SafeJSONResponse)
    app.state.ctx = context
    app.include_router(routes.router)
    app.include_router(panel.router)
    app.mount("/static", StaticFiles(directory=str(panel.HERE / "static")), name="static")
    docs_html, docs_csp = _docs_page(app)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_html)

    _add_error_handlers(app)
    app.add_middleware(RequestLog)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(Guard, settings=context.settings, ctx=context,
                       csp_for=lambda path: docs_csp if path == "/docs" else None)
    return app


def _docs_page(app: FastAPI) -> tuple[str, str]:
    """Swagger UI's page and its own CSP: its one inline script allowed by hash, its
    files from the CDN it loads them from; never framed."""
    html = bytes(get_swagger_ui_html(openapi_url="/openapi.json",
                                     title=f"{app.title} - API docs").body).decode()
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in scripts)
    csp = (f"default-src 'self'; script-src 'self' {SWAGGER_CDN} {hashes}; "
           f"style-src 'self' {SWAGGER_CDN} 'unsafe-inline'; img-src 'self' data: "
           "https://fastapi.tiangolo.com; connect-src 'self'; object-src 'none'; "
           "base-uri 'none'; frame-ancestors 'none'")
    return html, csp


# --- errors ---------------------------------------------------------------------------


def error_response(err: AutonomyError) -> JSONResponse:
    """An ``AutonomyError`` as its JSON answer and HTTP status."""
    headers = {"WWW-Authenticate": "Bearer"} if err.http_status == 401 else None
    return SafeJSONResponse(jsonable_encoder(err.to_wire()), status_code=err.http_status,
                            headers=headers)


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip()
    return text.splitlines()[0][:300] if text else type(orig).__name__


def _add_error_handlers(app: FastAPI) -> None:
    async def autonomy_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, AutonomyError)
        return error_response(e)

    async def redis_error(request: Request, e: Exception) -> JSONResponse:
        if is_unavailable(e):  # down, stalled, OOM, READONLY, NOAUTH, DENIED, ...
            return error_response(redis_unavailable(e))
        return await unexpected(request, e)

    async def database_down(_: Request, e: Exception) -> JSONResponse:
        return error_response(
            DatabaseUnavailable(f"the database cannot be reached: {_first_line(e)}"))

    async def database_refused_value(_: Request, e: Exception) -> JSONResponse:
        return error_response(InvalidInput(f"the database refused a value: {_first_line(e)}"))

    async def database_conflict(_: Request, e: Exception) -> JSONResponse:
        return error_response(Conflict(f"the change conflicts with another: {_first_line(e)}"))

    async def validation(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return error_response(InvalidInput(f"{where or 'request'}: {first.get('msg', 'invalid')}",
                                           field=where or None))

    async def http_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code,
                                                                 f"http_{e.status_code}")
        return SafeJSONResponse({"ok": False, "error": code, "message": str(e.detail)},
                                status_code=e.status_code, headers=e.headers)

    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error answering %s %s", request.method, request.url.path,
                  exc_info=e, extra={"request_id": getattr(request.state, "request_id", None)})
        return SafeJSONResponse({"ok": False, "error": "internal_error",
                                 "message": "unexpected server error; see the server log"},
                                status_code=500)

    app.add_exception_handler(AutonomyError, autonomy_error)
    app.add_exception_handler(redis.RedisError, redis_error)
    for exc in (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError):
        app.add_exception_handler(exc, database_down)
    app.add_exception_handler(sa.exc.DataError, database_refused_value)
    app.add_exception_handler(sa.exc.IntegrityError, database_conflict)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


# --- OpenAPI ------------------------------------------------------------------------------


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the action request union, with FastAPI's 422 answers replaced
    by the 400 ``invalid_input`` this app really gives."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes, tags=app.openapi_tags)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    union = TypeAdapter(schemas.request_schema(app.state.ctx.settings).union).json_schema(
        ref_template="#/components/schemas/{model}")
    comps.update(union.pop("$defs", {}))
    comps["ActionRequest"] = union
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    for path in schema.get("paths", {}).values():
        for op in path.values():
            if op.get("security"):  # the token is needed by mutating actions only
                op["security"] = [*op["security"], {}]
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {
                    "description": "Bad input (`invalid_input`).",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorAnswer"}}}})
    comps.setdefault("ErrorAnswer", schemas.ErrorAnswer.model_json_schema(
        ref_template="#/components/schemas/{model}"))
    app.openapi_schema = schema
    return schema
