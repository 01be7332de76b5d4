"""Who may do what over HTTP (SPEC 4.10): the credential a request carries, and the
rules of its scope.

- The credential is ``Authorization: Bearer <secret>``, or the panel's session cookie
  (``autonomy_session``: HttpOnly, SameSite=Strict, set by ``POST /login``).
- With no credential configured (no ``AUTONOMY_API_TOKEN``, none minted) nothing is
  asked, as before -- the server then listens on loopback only.
- Otherwise every ``POST /api/autonomy`` needs a credential (checked before the body is
  read) and every other path but the open ones needs ``read`` (``operator`` or
  ``read``): the panel, status, tasks, and ``/metrics`` when
  ``AUTONOMY_METRICS_REQUIRE_READ`` is set. Open: ``/livez``, ``/readyz``, the login page,
  static files, the API docs and their schema (they show no data), ``/metrics`` by
  default (it carries no task text).
- Per action (``authorize``): ``operator`` may do everything; ``worker`` may ``claim``,
  ``heartbeat``, ``complete``, ``complete_many`` and ``release`` in its lanes under its
  worker name(s), and its leases only; ``read`` may ``status``, ``history``,
  ``fingerprint_count`` and ``tasks``. Any other action -- including ones added
  later -- is ``operator``'s. A refusal is ``403 forbidden_scope`` and an event.
"""

from __future__ import annotations

from typing import Any

from app.errors import AuthError, Forbidden
from app.ops import credentials
from app.principal import Principal
from app.storage.context import Context

COOKIE = "autonomy_session"
WORKER_ACTIONS = frozenset({"claim", "heartbeat", "complete", "complete_many", "release"})
READ_ACTIONS = frozenset({"status", "history", "fingerprint_count", "tasks"})
OPEN_PATHS = frozenset({"/livez", "/readyz", "/login", "/logout", "/docs", "/openapi.json",
                        "/favicon.ico"})
PANEL_PATHS = frozenset({"/", "/panel/sections"})


def presented(headers: dict[str, str]) -> str | None:
    """The secret a request carries: its bearer token, else the panel's cookie."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, given = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None  # another scheme, or none: no credential (401), never the cookie
        return given.strip()
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None


def is_open(ctx: Context, path: str) -> bool:
    """A path anyone may read, credentials or not."""
    if path in OPEN_PATHS or path.startswith("/static/"):
        return True
    return path == "/metrics" and not ctx.settings.metrics_require_read


def authenticate(ctx: Context, secret: str | None) -> Principal:
    """The credential ``secret`` is; ``unauthorized`` (none given) or ``forbidden``."""
    if secret is None:
        raise AuthError("this needs a credential: 'Authorization: Bearer <token>' "
                        "(AUTONOMY_API_TOKEN or one from 'autonomy token create')")
    p = credentials.resolve(ctx, secret) if secret else None
    if p is None:
        raise Forbidden("the bearer token is not a live credential of this server")
    return p


def identify(ctx: Context, secret: str | None) -> Principal | None:
    """None while no credential is configured (nothing is asked then); else the
    credential ``secret`` is, or ``unauthorized``/``forbidden``."""
    if not credentials.auth_enabled(ctx):
        return None
    return authenticate(ctx, secret)


def authorize(ctx: Context, p: Principal | None, request: dict[str, Any]) -> None:
    """May ``p`` run this (shape-checked) action? Raises ``forbidden_scope`` (an event)."""
    if p is None or p.scope == "operator":
        return
    action = str(request.get("action"))
    if p.scope == "read":
        if action not in READ_ACTIONS:
            raise credentials.refuse(ctx, p, action=action, assignee=_lane(request),
                                     message=f"credential {p.name!r} (read) may not "
                                             f"{action}")
        return
    if action not in WORKER_ACTIONS:
        raise credentials.refuse(ctx, p, action=action, assignee=_lane(request),
                                 message=f"credential {p.name!r} (worker) may not {action}")
    claims = []
    if action == "claim":
        claims.append((request.get("assignee"), request.get("worker")))
    nxt = request.get("claimNext")
    if action in ("complete", "complete_many") and isinstance(nxt, dict):
        claims.append((nxt.get("assignee"), nxt.get("worker")))
    for lane, worker in claims:
        if not p.may_use_lane(str(lane)):
            raise credentials.refuse(ctx, p, action=action, assignee=str(lane),
                                     data={"worker": worker},
                                     message=f"credential {p.name!r} is not bound to lane "
                                             f"{lane!r}")
        if not p.may_act_as(str(worker)):
            raise credentials.refuse(ctx, p, action=action, assignee=str(lane),
                                     data={"worker": worker},
                                     message=f"credential {p.name!r} may not act as "
                                             f"worker {worker!r}")


def _lane(request: dict[str, Any]) -> str | None:
    lane = request.get("assignee")
    return lane if isinstance(lane, str) else None
