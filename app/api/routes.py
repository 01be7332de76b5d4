"""The JSON API: ``POST /api/autonomy`` (every action, through ``app.ops.dispatch``),
``GET /api/autonomy/status``, ``GET /api/autonomy/tasks``, ``GET /metrics`` and the probes
``GET /livez`` (no I/O) and ``GET /readyz`` (database, schema and Redis; 503 naming what
failed).

With any credential configured every POST needs one (checked before the body is read, by
``app.api.guard``) and each action the scope for it (``app.api.auth``); status and tasks
need ``read``; ``/metrics`` stays open unless ``metrics_require_read``; the probes stay
open.
Refusals are raised as ``AutonomyError`` and answered by the handlers in ``app.api.app``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from anyio.to_thread import run_sync
from fastapi import APIRouter, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app import ops, principal, validate
from app.api import auth, long_poll, metrics, schemas
from app.api.deps import (
    Authorization,
    Body,
    Ctx,
    JsonBody,
    SafeJSONResponse,
    body_object,
    check_token,
)
from app.errors import AuthError
from app.ops import credentials, history, probes
from app.storage.context import Context

router = APIRouter()

_REQUEST_BODY = {
    "required": True,
    "description": "`{\"action\": ..., ...}`: one of the actions, its fields in camelCase.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ActionRequest"}}},
}


def _json(answer: dict[str, Any]) -> JSONResponse:
    return SafeJSONResponse(jsonable_encoder(answer))


@router.post(
    "/api/autonomy", response_model=schemas.ActionAnswer, responses=schemas.ERROR_RESPONSES,
    summary="Run one action", openapi_extra={"requestBody": _REQUEST_BODY},
    operation_id="act", tags=["actions"],
    description="Every action of the SPEC by its wire name (`create`, `claim`, `heartbeat`, "
                "`complete`, `complete_many`, `release`, `pause_lane`, `resume_lane`, "
                "`configure_lane`, `fingerprint_count`, `status`, `history`, `ops_incident`, "
                "`cancel`, `requeue`, `tasks`). Mutating "
                "actions need the bearer token when the server has one. Every answer has "
                "`ok`; a refusal has `error` (a stable code) and `message`. A 200 answer "
                "echoes `action`: the one schema per action, discriminated on it.",
)
async def act(ctx: Ctx, body: JsonBody, authorization: Authorization, request: Request
              ) -> Response:
    """Authorise (mutations), check the shape, dispatch -- in a worker thread; a claim
    that waits (``waitMs``, a long poll) waits as a coroutine (``app.api.long_poll``: no
    thread per waiter) and takes a thread only to claim once it is handed a turn."""
    v = body.value
    who = getattr(request.state, "principal", None)
    # a batched claim (``max``) waits inside its one step, on the threadpool like any
    # other action: it is not a long poll
    if (isinstance(v, dict) and v.get("action") == "claim" and v.get("waitMs")
            and v.get("max") is None):
        if waiting(request.app.state) < ctx.settings.api_long_poll_max:
            return await _long_poll(ctx, body, authorization, who, request)
        # every slot waits already: answer now (an HTTP worker then polls)
        body = Body({**v, "waitMs": None})
    return await run_sync(_act, ctx, body, authorization, who)


def _checked(ctx: Context, body: Body, authorization: str | None,
             who: principal.Principal | None) -> dict[str, Any]:
    """The request, authorised and of a valid shape (the checks ``_act`` makes)."""
    request = body_object(body, ctx.settings)
    action = request.get("action")
    if who is None and credentials.auth_enabled(ctx):  # the guard let none through
        raise AuthError("this action needs a credential")
    if who is None and isinstance(action, str) and action in ops.MUTATING:
        check_token(ctx.settings, authorization)
    schemas.check_shape(request, ctx.settings)
    with principal.acting(who):
        auth.authorize(ctx, who, request)
    return request


def _act(ctx: Context, body: Body, authorization: str | None,
         who: principal.Principal | None = None) -> Response:
    request = _checked(ctx, body, authorization, who)
    with principal.acting(who):
        # ``action`` echoed: the discriminator of the answer's schema (an added field)
        return _json({**ops.dispatch(ctx, request), "action": request.get("action")})


def _checked_claim(ctx: Context, body: Body, authorization: str | None,
                   who: principal.Principal | None) -> dict[str, Any]:
    request = _checked(ctx, body, authorization, who)
    # the lane as the claim names it (checked first, as the claim itself does)
    return {**request, "assignee": validate.assignee(request.get("assignee"),
                                                     ctx.settings)}


async def _long_poll(ctx: Context, body: Body, authorization: str | None,
                     who: principal.Principal | None, request: Request) -> Response:
    state = request.app.state
    state.long_polls_waiting = waiting(state) + 1
    try:
        fields = await run_sync(_checked_claim, ctx, body, authorization, who)
        answer = await long_poll.claim(request, ctx, fields, who)
    finally:
        state.long_polls_waiting -= 1
    if answer is None:  # the client went away: nobody reads this
        return Response(status_code=499)
    return _json({**answer, "action": "claim"})


def waiting(state: Any) -> int:
    """Long-poll claims of this app in progress (at most ``api_long_poll_max``)."""
    return int(getattr(state, "long_polls_waiting", 0))


_READ_REFUSALS: dict[int | str, dict[str, Any]] = {
    k: schemas.ERROR_RESPONSES[k] for k in (401, 403)}


@router.get("/api/autonomy/status", response_model=schemas.StatusAnswer,
            responses={503: schemas.ERROR_RESPONSES[503], **_READ_REFUSALS},
            summary="The status payload", operation_id="get_status", tags=["reads"])
def status(ctx: Ctx) -> Response:
    """The same answer as the ``status`` action."""
    return _json(ops.dispatch(ctx, {"action": "status"}))


@router.get("/api/autonomy/tasks", response_model=schemas.TasksAnswer,
            responses={400: schemas.ERROR_RESPONSES[400], 503: schemas.ERROR_RESPONSES[503],
                       **_READ_REFUSALS},
            summary="Recent tasks, newest first", operation_id="list_tasks", tags=["reads"])
def tasks(
    ctx: Ctx,
    assignee: Annotated[str | None, Query(description="Only this lane.", max_length=256)] = None,
    status: Annotated[Literal["todo", "in_progress", "done", "cancelled", "dead"] | None,
                      Query(description="Only this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="At most this many.")] = 50,
) -> Response:
    """What the panel's task list shows."""
    lane = validate.assignee(assignee, ctx.settings) if assignee is not None else None
    return _json({"ok": True,
                  "tasks": history.recent_tasks(ctx, assignee=lane, status=status,
                                                limit=limit)})


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format."},
                       503: schemas.ERROR_RESPONSES[503], **_READ_REFUSALS},
            summary="Prometheus metrics", operation_id="get_metrics", tags=["metrics"])
def prometheus(ctx: Ctx) -> Response:
    """Run-locks, periodic jobs, lanes, the breaker, GO/NO_GO/unknown, counters, Redis and
    the beat leader (see ``app.api.metrics`` for the names and their rules)."""
    payload = ops.dispatch(ctx, {"action": "status"})
    return Response(metrics.render(payload), media_type=metrics.CONTENT_TYPE)


@router.get("/livez", summary="Liveness: the process serves (no I/O)",
            operation_id="livez", tags=["probes"],
            responses={200: {"description": "`{ok: true, pid, nonce, longPolls}`"}})
def livez(ctx: Ctx, request: Request) -> Response:
    """Answers from memory: the pid, the start nonce ``autonomy up`` gave this process
    (so ``up`` knows it is its own child answering, not another process on the port) and
    ``longPolls``, the claims waiting in this process now."""
    return _json({"ok": True, "pid": os.getpid(), "nonce": ctx.settings.start_nonce,
                  "longPolls": waiting(request.app.state)})


@router.get("/readyz", summary="Readiness: database reachable and migrated, Redis reachable",
            operation_id="readyz", tags=["probes"],
            responses={503: {"description": "Not ready: `failed` names the parts, `message` "
                                            "says why; Redis down is `redis: degraded`."}})
def readyz(ctx: Ctx) -> Response:
    """200 when the database answers at the code's schema head and Redis answers; else 503
    with ``error: not_ready`` and ``failed`` naming each part that is not."""
    answer = probes.ready(ctx)
    return SafeJSONResponse(jsonable_encoder(answer), status_code=200 if answer["ok"] else 503)
