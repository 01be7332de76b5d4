"""Readiness: is the fleet failing in a sustained way? (SPEC 4.5)

- ``sustained_backlog_stall``: a stall (claimable backlog, nothing completed since the last
  run) seen on at least two runs -- ``prev_backlog_since > 0`` -- that has lasted at least
  ``backlog_stall_min_s``. A first observation is never sustained, however old the last
  completion is.
- ``sustained_ops_failure``: the ops incident state (through its stale rule) was
  ``warning``/``critical`` (or unreadable) on ``ops_issue_threshold`` consecutive runs.
- the handoff snapshot, read through its stale rule, says ``NO_GO`` -- or cannot be read
  (corrupt, wrong shape, written in the future): never GO on a snapshot nobody can read;
  ``handoffError`` says why (``missing`` before the first handoff run decides nothing).

Any of the three makes readiness ``NO_GO``. The stall clock and the counter live in the
``readiness`` state; a missing or unreadable state starts them again and is reported.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from app.clock import from_ms, iso, iso_ms, to_ms
from app.ops.checks import handoff, runs, state
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction

GO, NO_GO = handoff.GO, handoff.NO_GO


def _shape(d: Any) -> str | None:
    for key in ("ranAt", "backlogSince", "opsIssueConsecutive"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            return f"{key} must be a non-negative integer"
    return None


def run_readiness(ctx: Context, fence: state.Fence | None = None) -> dict[str, Any]:
    """Observe the stall and the ops incident, step their trackers, write the state (only
    while ``fence``'s run-lock is still held)."""
    s = ctx.settings
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)  # the stall clock compares stored times: the one clock
        now_ms = to_ms(now)
        states = runs.load_states(conn, now=now)
        prev = states.get(state.READINESS, _shape)
        p = prev.data or {}
        sig = store.queue_signals(conn, now=now)

        ran_at = p.get("ranAt")
        window_start = (from_ms(ran_at) if ran_at
                        else now - timedelta(seconds=s.backlog_stall_min_s))
        last = sig["lastCompletedAt"]
        stalled = bool(sig["backlog"]) and (last is None or last < window_start)
        prev_since = int(p.get("backlogSince") or 0)
        began = to_ms(last) if last is not None else now_ms  # when this stall began
        since = (prev_since or began) if stalled else 0
        stall_s = (now_ms - since) / 1000 if since else 0.0
        sustained_stall = stalled and prev_since > 0 and stall_s >= s.backlog_stall_min_s

        inc = state.incident(states, ctx=ctx)
        ops_issue = bool(inc["error"]) or inc["status"] in ("warning", "critical")
        ops_consecutive = int(p.get("opsIssueConsecutive") or 0) + 1 if ops_issue else 0
        sustained_ops = ops_consecutive >= s.ops_issue_threshold

        ho = handoff.snapshot_view(conn, ctx, states)
        # a snapshot that exists but cannot be read (corrupt JSON, wrong shape, a time in
        # the future) is never read as GO: NO_GO, the error shown (SPEC 4.4, 4.7). A
        # missing one (handoff has not run yet) is reported, and decides nothing.
        ho_error = ho["error"] if ho["error"] not in (None, "missing") else None
        verdict = NO_GO if (sustained_stall or sustained_ops or ho["state"] == NO_GO
                            or ho_error) else GO
        data = {"ranAt": now_ms, "state": verdict, "backlogSince": since,
                "prevBacklogSince": prev_since, "stalled": stalled,
                "sustainedBacklogStall": sustained_stall,
                "opsIssue": ops_issue, "opsIssueConsecutive": ops_consecutive,
                "sustainedOpsFailure": sustained_ops, "handoffState": ho["state"],
                "handoffStale": ho["stale"], "handoffError": ho["error"]}
        if fence is not None:
            fence.check("the readiness state")
        state.write(conn, name=state.READINESS, data=data, now=now)
    return {"ok": True, **_wire(data, now=now), "generatedAt": iso(now),
            "stallSeconds": int(stall_s), "opsIncident": inc["status"],
            "previousStateError": None if prev.error in (None, "missing") else prev.error}


def _wire(d: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    return {"state": d.get("state"),
            "sustainedBacklogStall": d.get("sustainedBacklogStall") is True,
            "sustainedOpsFailure": d.get("sustainedOpsFailure") is True,
            # 0 means "no stall": no time to show
            "backlogSince": iso_ms(d.get("backlogSince") or None),
            "prevBacklogSince": iso_ms(d.get("prevBacklogSince") or None),
            "stalled": d.get("stalled") is True,
            "opsIssueConsecutive": d.get("opsIssueConsecutive") or 0,
            "handoffState": d.get("handoffState"),
            "handoffError": d.get("handoffError")}


def readiness_view(states: state.States, ctx: Context) -> dict[str, Any]:
    """The last readiness result for the status payload, ``stale`` when older than
    ``handoff_stale_after_s``; a missing or unreadable state says so in ``error``."""
    now = states.now
    r = states.get(state.READINESS, _shape)
    out: dict[str, Any] = {"state": None, "sustainedBacklogStall": False,
                           "sustainedOpsFailure": False, "backlogSince": None,
                           "prevBacklogSince": None, "opsIssueConsecutive": 0,
                           "generatedAt": iso(r.written_at), "stale": False, "error": r.error}
    if r.data is not None:
        out.update(_wire(r.data, now=now))
        out["stale"] = (r.age_s(now) or 0.0) > ctx.settings.handoff_stale_after_s
    return out
