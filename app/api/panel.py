"""The control panel at ``/``: server-rendered (Jinja2) from the status payload, the
recent tasks and the recent events (who did what: the credential, and the caller's own
note beside it), then kept fresh by ``static/panel.js``, which fetches ``/panel/sections``
(the same template's sections) every few seconds and swaps the ones that changed. One
rendering path, no JavaScript build step.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from app import ops
from app.api import auth
from app.api.deps import Ctx, JsonBody, SafeJSONResponse, body_object
from app.errors import Forbidden, InvalidInput, Unavailable
from app.ops import credentials, history, lifecycle
from app.storage.context import Context
from app.validate import NAME_PATTERN, TASK_KINDS, TASK_STATUSES

HERE = Path(__file__).parent
TASKS_SHOWN = 50
EVENTS_SHOWN = 20

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))


def view(ctx: Context, filters: dict[str, str] | None = None,
         signed_in: bool = False) -> dict[str, Any]:
    """What the page shows; an unreachable service is shown, not raised. ``filters``
    (``status``, ``assignee``, ``kind`` from the page's query) narrow the task list;
    ``signed_in``: the page was asked for with a credential (its cookie also carries the
    changes)."""
    s = ctx.settings
    out: dict[str, Any] = {
        "now": ctx.clock(), "status": None, "tasks": [], "events": [], "error": None,
        "filters": filters or {}, "statuses": TASK_STATUSES,
        "auth_required": not signed_in and credentials.bootstrap_token(ctx) is not None,
        "refresh_ms": s.panel_refresh_ms,
        "thresholds": {"breaker": s.breaker_threshold, "handoffFail": s.handoff_fail_threshold,
                       "recovery": s.recovery_threshold, "opsIssue": s.ops_issue_threshold},
    }
    try:
        out["status"] = ops.dispatch(ctx, {"action": "status"})
        if filters:
            out["tasks"] = lifecycle.list_tasks(ctx, limit=TASKS_SHOWN, **filters)["tasks"]
        else:
            out["tasks"] = history.recent_tasks(ctx, limit=TASKS_SHOWN)
        out["events"] = history.recent_events(ctx, limit=EVENTS_SHOWN)
    except Unavailable as e:
        out["error"] = e.to_wire()
    return out


def task_filters(request: Request) -> dict[str, str]:
    """The task list's filters from the query (``?status=dead&assignee=coder``); a value
    that is not a valid filter is left out (the list is then unfiltered by it)."""
    q = request.query_params
    out: dict[str, str] = {}
    if q.get("status") in TASK_STATUSES:
        out["status"] = q["status"]
    if q.get("kind") in TASK_KINDS:
        out["kind"] = q["kind"]
    lane = q.get("assignee") or ""
    if lane and re.fullmatch(NAME_PATTERN, lane) and len(lane) <= 64:
        out["assignee"] = lane
    return out


@router.get("/", response_class=HTMLResponse)
def page(request: Request, ctx: Ctx) -> Response:
    """The whole page (first paint); the login page while no credential is given."""
    if getattr(request.state, "login", None) is not None:
        # 200: a page to sign in on, not an error (it shows nothing of the fleet)
        return templates.TemplateResponse(request, "login.html", {},
                                          headers={"Cache-Control": "no-store"})
    v = view(ctx, task_filters(request),
             signed_in=getattr(request.state, "principal", None) is not None)
    return templates.TemplateResponse(request, "panel.html", v,
                                      status_code=503 if v["error"] else 200)


@router.get("/panel/sections", response_class=HTMLResponse)
def sections(request: Request, ctx: Ctx) -> Response:
    """Only the sections, for the page's refresh."""
    v = view(ctx, task_filters(request),
             signed_in=getattr(request.state, "principal", None) is not None)
    return templates.TemplateResponse(request, "_sections.html", v,
                                      status_code=503 if v["error"] else 200,
                                      headers={"Cache-Control": "no-store"})


@router.post("/login")
def login(request: Request, ctx: Ctx, body: JsonBody) -> Response:
    """``{"token": secret}`` -> a session cookie for the panel (HttpOnly, SameSite=Strict,
    Secure over https), when the secret is a live credential that may read."""
    token = body_object(body, ctx.settings).get("token")
    if not isinstance(token, str) or not token.strip():
        raise InvalidInput("give the credential as 'token'", field="token")
    p = auth.authenticate(ctx, token.strip())
    if not p.may_read():
        raise Forbidden(f"credential {p.name!r} ({p.scope}) may not read the panel")
    resp = SafeJSONResponse({"ok": True, "name": p.name, "scope": p.scope})
    resp.set_cookie(auth.COOKIE, token.strip(), httponly=True, samesite="strict",
                    secure=request.url.scheme == "https", path="/")
    return resp


@router.post("/logout")
def logout() -> Response:
    """Forget the panel's session cookie."""
    resp = SafeJSONResponse({"ok": True})
    resp.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="strict")
    return resp


# --- template filters ------------------------------------------------------------------


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def fmt_time(value: Any) -> str:
    """``2025-11-25 01:23:45 UTC`` (or ``-``)."""
    dt = _parse(value)
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC") if dt else "-"


def fmt_ago(value: Any, now: datetime) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago`` (or ``-``)."""
    dt = _parse(value)
    if dt is None:
        return "-"
    secs = int((now - dt).total_seconds())
    if secs == 0:
        return "just now"
    if secs < 0:
        return "in " + fmt_duration(-secs * 1000)
    return fmt_duration(secs * 1000) + " ago"


def fmt_duration(ms: Any) -> str:
    """``850ms``, ``42s``, ``3m 05s``, ``2h 10m``, ``3d 4h``."""
    if isinstance(ms, bool) or not isinstance(ms, int | float):
        return "-"
    ms = int(ms)
    if ms < 1000:
        return f"{ms}ms"
    s = ms // 1000
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def meter_step(pct: Any) -> int:
    """A meter's fill as a multiple of 5 (0..100): the ``w<N>`` class in panel.css (the
    CSP allows no inline style)."""
    try:
        return max(0, min(100, round(float(pct) / 5) * 5))
    except (TypeError, ValueError):
        return 0


templates.env.filters.update(ts=fmt_time, ago=fmt_ago, dur=fmt_duration)
templates.env.globals["meter_step"] = meter_step
