"""The failure fingerprint breaker: the same validation failure cannot repeat forever.

A failure's fingerprint is ``"{assignee}:{normalised reason}"``. When one fingerprint has
failed ``breaker_threshold`` times within ``breaker_window_h`` (counted since the lane's
last resume, so a resume is a fresh start), the lane pauses and one ``ops_remediation``
task is filed in the remediation lane.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, RowMapping

from app.clock import iso
from app.ops import lifecycle
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import TaskKind, TaskStatus

_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_HEX = re.compile(r"\b(?:0x)?(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,}\b")
_NUM = re.compile(r"\d+(?:\.\d+)?")
_SPACE = re.compile(r"\s+")
MAX_REASON_IN_FINGERPRINT = 300


def normalise_reason(reason: str) -> str:
    """Trim, case-fold, and replace volatile parts (ids, hashes, numbers) so that the same
    failure groups under one fingerprint."""
    text = reason.strip().casefold()
    text = _UUID.sub("<id>", text)
    text = _HEX.sub("<hash>", text)
    text = _NUM.sub("<n>", text)
    text = _SPACE.sub(" ", text)
    return text[:MAX_REASON_IN_FINGERPRINT]


def fingerprint(assignee: str, reason: str) -> str:
    """``"{assignee}:{normalised reason}"``."""
    return f"{assignee}:{normalise_reason(reason)}"


def normalise_fingerprint(fp: str) -> str:
    """A fingerprint as a query may give it -- ``lane:reason as written`` -- in the form the
    breaker records (``fingerprint``); already normalised, it is unchanged. Lane names
    hold no colon, so the first one ends the lane."""
    assignee, colon, reason = fp.partition(":")
    return fingerprint(assignee, reason) if colon else fp


def window_start(*, now: datetime, window_h: float, resumed_at: datetime | None) -> datetime:
    """Start of the counting window: ``now - window``, or the lane's last resume if later."""
    start = now - timedelta(hours=window_h)
    return max(start, resumed_at) if resumed_at else start


def record_failure(ctx: Context, conn: Connection, *, task: RowMapping, lane: RowMapping,
                   reason: str, result: dict[str, Any] | None, now: datetime,
                   actor: str | None) -> dict[str, Any]:
    """Inside the complete transaction: stamp, log, requeue, count, and trip if due.

    The caller holds the lane row lock, so two failures of one lane never race here.
    Answers the breaker's fields for the complete answer.
    """
    s = ctx.settings
    assignee = task["assignee"]
    fp = fingerprint(assignee, reason)
    # the lifecycle (SPEC 4.11): back to todo after its backoff, or dead at max_attempts
    status, not_before = lifecycle.after_failure(task, lane, s, now)
    store.return_failed(conn, task_id=task["id"], token=task["lease_token"], fingerprint=fp,
                        reason=reason, now=now, result=result, status=status,
                        not_before=not_before)
    store.insert_fingerprint(conn, fingerprint=fp, assignee=assignee, reason=reason,
                             task_id=task["id"], now=now)
    since = window_start(now=now, window_h=s.breaker_window_h, resumed_at=lane["resumed_at"])
    count = store.count_fingerprint(conn, fingerprint=fp, since=since)
    events: list[dict[str, Any]] = [{
        "kind": "fingerprint_recorded", "at": now, "assignee": assignee, "task_id": task["id"],
        "actor": actor, "reason": reason,
        "data": {"fingerprint": fp, "count": count, "threshold": s.breaker_threshold},
    }]
    if status == TaskStatus.dead.value:
        events.append({"kind": "task_dead", "at": now, "assignee": assignee,
                       "task_id": task["id"], "actor": actor, "reason": reason,
                       "data": {"attempts": int(task["attempts"]) + 1,
                                "maxAttempts": lifecycle.lane_max_attempts(lane, s)}})
    answer: dict[str, Any] = {"failureFingerprint": fp, "fingerprintCount": count,
                              "lanePaused": bool(lane["paused"])}
    if count >= s.breaker_threshold:
        answer.update(_trip(ctx, conn, lane=lane, fp=fp, count=count, since=since, now=now,
                            events=events))
    store.insert_events(conn, rows=events)
    return answer


def _trip(ctx: Context, conn: Connection, *, lane: RowMapping, fp: str, count: int,
          since: datetime, now: datetime, events: list[dict[str, Any]]) -> dict[str, Any]:
    s = ctx.settings
    assignee = lane["assignee"]
    out: dict[str, Any] = {"lanePaused": True, "breakerTripped": True}
    if not lane["paused"]:
        reason = f"failure fingerprint breaker: {fp!r} failed {count} times"
        store.set_lane_pause(conn, assignee=assignee, paused=True, reason=reason, now=now)
        events.append({"kind": "lane_paused", "at": now, "assignee": assignee,
                       "actor": "breaker", "reason": reason,
                       "data": {"fingerprint": fp, "count": count}})
        out["pauseReason"] = reason
        out["pausedAt"] = iso(now)
    existing = store.open_remediation(conn, fingerprint=fp)
    if existing is not None:
        out["remediationTaskId"] = existing["id"]
        out["remediationCreated"] = False
        return out
    task_ids = store.fingerprint_task_ids(conn, fingerprint=fp, since=since)
    ops = s.remediation_lane
    store.ensure_lane(conn, assignee=ops, now=now, max_in_flight=s.default_max_in_flight)
    ops_lane = store.get_lane(conn, assignee=ops)
    paused = bool(ops_lane and ops_lane["paused"])
    row = store.insert_task(conn, values={
        "title": f"Remediate lane {assignee}: repeated failure ({count}x)"[:500],
        "assignee": ops, "kind": TaskKind.ops_remediation.value,
        "status": TaskStatus.todo.value, "priority": 100,
        "payload": {"fingerprint": fp, "count": count, "assignee": assignee,
                    "taskIds": task_ids, "windowStart": iso(since)},
        "failure_fingerprint": fp, "attempts": 0,
        "lane_paused": paused,
        "lane_paused_reason": ops_lane["paused_reason"] if paused and ops_lane else None,
        "lane_paused_at": ops_lane["paused_at"] if paused and ops_lane else None,
        "created_at": now, "updated_at": now,
    })
    events.append({"kind": "remediation_created", "at": now, "assignee": ops,
                   "task_id": row["id"], "actor": "breaker",
                   "data": {"fingerprint": fp, "count": count, "taskIds": task_ids,
                            "lane": assignee}})
    out["remediationTaskId"] = row["id"]
    out["remediationCreated"] = True
    return out


def fingerprint_count(ctx: Context, *, fingerprint: str, window_hours: float | None = None
                      ) -> int:
    """How many failures of ``fingerprint`` in the last ``window_hours`` (default the
    breaker window). The change log's getFailureFingerprintCount."""
    hours = ctx.settings.breaker_window_h if window_hours is None else window_hours
    with transaction(ctx.engine, write=False) as conn:
        since = ctx.now_in(conn) - timedelta(hours=hours)
        return store.count_fingerprint(conn, fingerprint=fingerprint, since=since)
