"""Every action by its wire name, with its wire field names: the one table that the HTTP
API, the CLI and remote workers dispatch through.

``dispatch(ctx, {"action": "claim", "assignee": "coder", "worker": "w1"})`` answers the
same dict as ``lanes.claim(ctx, assignee="coder", worker="w1")``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from app import validate
from app.errors import InvalidAction, InvalidInput
from app.ops import batch, breaker, history, lane_control, lanes, lifecycle
from app.storage.context import Context

MUTATING = frozenset({"create", "claim", "heartbeat", "complete", "complete_many", "release",
                      "pause_lane", "resume_lane", "configure_lane", "ops_incident",
                      "cancel", "requeue"})


def _fingerprint_count(ctx: Context, f: Mapping[str, Any]) -> dict[str, Any]:
    fp = breaker.normalise_fingerprint(validate.fingerprint(f.get("fingerprint")))
    hours = f.get("windowHours")
    if hours is not None:
        hours = validate.window_hours(hours)
    count = breaker.fingerprint_count(ctx, fingerprint=fp, window_hours=hours)
    return {"ok": True, "fingerprint": fp, "count": count,
            "windowHours": hours if hours is not None else ctx.settings.breaker_window_h,
            "threshold": ctx.settings.breaker_threshold}


def _status(ctx: Context, f: Mapping[str, Any]) -> dict[str, Any]:
    from app.ops.checks.status import build_status

    return build_status(ctx)


def _ops_incident(ctx: Context, f: Mapping[str, Any]) -> dict[str, Any]:
    from app.ops.checks.state import set_ops_incident

    return set_ops_incident(ctx, status=f.get("status"), reason=f.get("reason"),
                            actor=f.get("actor"))


ACTIONS: dict[str, Callable[[Context, Mapping[str, Any]], dict[str, Any]]] = {
    "create": lambda ctx, f: lanes.create(
        ctx, assignee=f.get("assignee"), title=f.get("title"),  # type: ignore[arg-type]
        priority=f.get("priority"), payload=f.get("payload"), actor=f.get("actor"),
        dedupe_key=f.get("dedupeKey"), not_before=f.get("notBefore"),
        delay_s=f.get("delayS")),
    "claim": lambda ctx, f: lanes.claim(
        ctx, assignee=f.get("assignee"), worker=f.get("worker"),  # type: ignore[arg-type]
        wait_ms=f.get("waitMs"), clock_skew_ms=f.get("clockSkewMs"),
    ) if f.get("max") is None else batch.claim(
        ctx, assignee=f.get("assignee"), worker=f.get("worker"),  # type: ignore[arg-type]
        max_n=f.get("max"), wait_ms=f.get("waitMs"), clock_skew_ms=f.get("clockSkewMs")),
    "heartbeat": lambda ctx, f: lanes.heartbeat(
        ctx, task_id=f.get("taskId"), lease_token=f.get("leaseToken"),
        clock_skew_ms=f.get("clockSkewMs")),
    "complete": lambda ctx, f: lanes.complete(
        ctx, task_id=f.get("taskId"), lease_token=f.get("leaseToken"),
        outcome=f.get("outcome"), validation_reason=f.get("validationReason"),
        result=f.get("result"), actor=f.get("actor"), claim_next=f.get("claimNext"),
        clock_skew_ms=f.get("clockSkewMs")),
    "complete_many": lambda ctx, f: batch.complete_many(
        ctx, items=f.get("items"), actor=f.get("actor"), claim_next=f.get("claimNext"),
        max_n=f.get("max"), clock_skew_ms=f.get("clockSkewMs")),
    "release": lambda ctx, f: lanes.release(
        ctx, task_id=f.get("taskId"), lease_token=f.get("leaseToken"), actor=f.get("actor")),
    "pause_lane": lambda ctx, f: lane_control.pause_lane(
        ctx, assignee=f.get("assignee"), reason=f.get("reason"),  # type: ignore[arg-type]
        actor=f.get("actor")),
    "resume_lane": lambda ctx, f: lane_control.resume_lane(
        ctx, assignee=f.get("assignee"), actor=f.get("actor"),  # type: ignore[arg-type]
        reason=f.get("reason")),
    "configure_lane": lambda ctx, f: lane_control.configure_lane(
        ctx, assignee=f.get("assignee"), max_in_flight=f.get("maxInFlight"),  # type: ignore[arg-type]
        actor=f.get("actor"), max_attempts=f.get("maxAttempts"),
        backoff_base_s=f.get("backoffBaseS"), backoff_cap_s=f.get("backoffCapS")),
    "fingerprint_count": _fingerprint_count,
    "history": lambda ctx, f: history.history(
        ctx, task_id=f.get("taskId"), assignee=f.get("assignee")),
    "status": _status,
    "ops_incident": _ops_incident,
    # the task lifecycle (SPEC 4.11)
    "cancel": lambda ctx, f: lifecycle.cancel(ctx, task_id=f.get("taskId"),
                                              actor=f.get("actor")),
    "requeue": lambda ctx, f: lifecycle.requeue(ctx, task_id=f.get("taskId"),
                                                actor=f.get("actor")),
    "tasks": lambda ctx, f: lifecycle.list_tasks(
        ctx, assignee=f.get("assignee"), status=f.get("status"), kind=f.get("kind"),
        limit=f.get("limit"), after=f.get("after")),
}


def dispatch(ctx: Context, request: Mapping[str, Any]) -> dict[str, Any]:
    """Run the action a request names; raises ``AutonomyError`` for any refusal.

    Every string in the request, at any depth, must be storable and answerable (no NUL,
    no lone surrogate; SPEC 4.8): refused here, naming the field, before anything runs."""
    if not isinstance(request, Mapping):
        raise InvalidInput("the request must be a JSON object with an 'action'")
    for name, value in request.items():
        validate.storable(name, "request")
        validate.storable(value, str(name), max_depth=2 * ctx.settings.json_max_depth + 2)
    action = request.get("action")
    fn = ACTIONS.get(action) if isinstance(action, str) else None
    if fn is None:
        raise InvalidAction(f"unknown action {action!r}; known: {', '.join(sorted(ACTIONS))}",
                            actions=sorted(ACTIONS))
    return fn(ctx, request)
