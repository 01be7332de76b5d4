"""FastAPI dependencies as ``Annotated`` aliases: the context, the settings, the request
body as JSON, and the bearer-token check for mutating actions."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app import validate
from app.errors import AuthError, Forbidden, InvalidInput
from app.settings import Settings
from app.storage.context import Context


def get_ctx(request: Request) -> Context:
    """The app's context (one per app, shared by its requests)."""
    ctx: Context = request.app.state.ctx
    return ctx


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return get_ctx(request).settings


Ctx = Annotated[Context, Depends(get_ctx)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@dataclass(frozen=True)
class Body:
    """The request body parsed as JSON, or why it could not be."""

    value: Any = None
    error: str | None = None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request, settings: SettingsDep) -> Body:
    """Read and parse the body (NaN/Infinity refused) without raising. Its size was
    capped before it was read (``app.api.guard``)."""
    raw = await request.body()
    if len(raw) > settings.request_max_bytes:  # served without the guard in front
        return Body(error=f"the request body is {len(raw)} bytes, over the "
                          f"{settings.request_max_bytes} limit")
    try:
        return Body(json.loads(raw, parse_constant=_no_constants))
    except RecursionError:
        return Body(error="the request body nests too deeply")
    except ValueError as e:
        return Body(error=f"the request body is not valid JSON: {str(e)[:200]}")


JsonBody = Annotated[Body, Depends(read_json)]

_bearer = HTTPBearer(auto_error=False, scheme_name="AutonomyApiToken",
                     description="`AUTONOMY_API_TOKEN`; needed by mutating actions.")


async def read_authorization(
        request: Request,
        _doc: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
    """The raw ``Authorization`` header (the ``HTTPBearer`` dependency only documents the
    scheme in OpenAPI; it cannot tell a missing header from a malformed one)."""
    return request.headers.get("authorization")


Authorization = Annotated[str | None, Depends(read_authorization)]


def configured_token(settings: Settings) -> str | None:
    """The API token, or None when none (or an empty one) is configured."""
    if settings.api_token is None:
        return None
    token = settings.api_token.get_secret_value().strip()
    return token or None


def check_token(settings: Settings, authorization: str | None) -> None:
    """Allow a mutating call: no token configured (the server is loopback-only then), or
    ``Bearer <token>`` matching in constant time. Missing → ``unauthorized`` (401),
    wrong → ``forbidden`` (403)."""
    expected = configured_token(settings)
    if expected is None:
        return
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthError("this action needs 'Authorization: Bearer <AUTONOMY_API_TOKEN>'")
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Forbidden("the bearer token is not this server's API token")


def body_object(body: Body, settings: Settings) -> dict[str, Any]:
    """The body as a JSON object, every string in it storable and its nesting bounded
    (iteratively: no input can exhaust the stack later), or ``invalid_input``."""
    if body.error is not None:
        raise InvalidInput(body.error)
    if not isinstance(body.value, dict):
        raise InvalidInput("the request must be a JSON object with an 'action'")
    for name, value in body.value.items():
        validate.storable(name, "request")
        validate.storable(value, str(name), max_depth=2 * settings.json_max_depth + 2)
    return body.value


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: encoding it cannot fail whatever a
    string holds, so no answer is ever lost after its change was committed."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, indent=None,
                          separators=(",", ":"), default=str).encode("ascii")
