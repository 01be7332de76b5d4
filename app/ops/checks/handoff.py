"""Handoff health: may the fleet keep running unattended? (SPEC 4.5)

Three criteria, each with its own consecutive counters:

- ``cron``: a periodic job errored on its last run, or missed its schedule;
- ``queue``: in-progress tasks whose lease expired, or a backlog stalled for at least
  ``backlog_stall_min_s`` (the stall clock readiness keeps);
- ``ops``: the ops incident state is ``critical`` and not stale.

A criterion turns the result ``NO_GO`` only after ``handoff_fail_threshold`` consecutive
failing runs, and turns back only after ``recovery_threshold`` consecutive passing runs:
hysteresis both ways, every counter in the snapshot. A signal that cannot be read counts
as failing (never silently healthy) and marks the snapshot ``snapshotValid: false``.

A previous snapshot that cannot be read (corrupt, SPEC 4.7) gives no hysteresis credit: a
failing criterion is ``NO_GO`` at once. The snapshot that run writes carries
``stateRecoveredAt`` and ``stateError`` (status shows them), and a
``check_state_recovered`` event is left, until a later run completes on valid state.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from app.clock import from_ms, iso, to_ms
from app.ops.checks import runs, state
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction

CRITERIA = ("cron", "queue", "ops")
GO, NO_GO = "GO", "NO_GO"


def live_signals(conn: Connection, ctx: Context, states: state.States
                 ) -> dict[str, dict[str, Any]]:
    """Each criterion as observed now: ``failing`` and a ``detail``, and ``readable``
    False when its signal could not be read (then it counts as failing)."""
    s, now = ctx.settings, states.now
    out: dict[str, dict[str, Any]] = {}

    jobs = runs.job_views(states, ctx)
    bad = [f"{j} errored ({v['error']})" for j, v in jobs.items() if v["ok"] is False]
    bad += [f"{j} missed its schedule" for j, v in jobs.items() if v["missed"]]
    unreadable = [f"{j} record unreadable ({v['stateError']})" for j, v in jobs.items()
                  if v["stateError"]]
    out["cron"] = {"failing": bool(bad or unreadable), "readable": not unreadable,
                   "detail": "; ".join(bad + unreadable) or "every job ran on time"}

    sig = store.queue_signals(conn, now=now)
    ready = states.get(state.READINESS)
    since = (ready.data or {}).get("backlogSince")
    stalled_s = (to_ms(now) - since) / 1000 if isinstance(since, int) and since > 0 else 0.0
    stalled = sig["backlog"] and stalled_s >= s.backlog_stall_min_s
    why = []
    if sig["expiredLeases"]:
        why.append(f"{sig['expiredLeases']} in-progress task(s) with an expired lease")
    if stalled:
        why.append(f"backlog stalled for {stalled_s / 60:.0f} min")
    readable = ready.error in (None, "missing")
    if not readable:
        why.append(f"readiness state unreadable ({ready.error})")
    out["queue"] = {"failing": bool(why), "readable": readable,
                    "detail": "; ".join(why) or "the queue moves"}

    inc = state.incident(states, ctx=ctx)
    if inc["error"]:
        out["ops"] = {"failing": True, "readable": False,
                      "detail": f"ops incident state unreadable ({inc['error']})"}
    else:
        critical = inc["status"] == "critical" and not inc["stale"]
        out["ops"] = {"failing": critical, "readable": True,
                      "detail": f"ops incident {inc['status']}"
                                + (" (stale: read as recovering)" if inc["stale"] else "")}
    return out


def _counters(prev: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    crit = (prev or {}).get("criteria")
    out = {}
    for name in CRITERIA:
        c = crit.get(name) if isinstance(crit, dict) else None
        c = c if isinstance(c, dict) else {}
        out[name] = {"consecutiveFailures": _count(c.get("consecutiveFailures")),
                     "consecutivePasses": _count(c.get("consecutivePasses")),
                     "noGo": c.get("noGo") is True}
    return out


def _count(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def step(counter: dict[str, Any], *, failing: bool, fail_threshold: int,
         recovery_threshold: int) -> dict[str, Any]:
    """One run's update of a criterion's counters (the hysteresis)."""
    c = dict(counter)
    if failing:
        c["consecutiveFailures"] += 1
        c["consecutivePasses"] = 0
        if c["consecutiveFailures"] >= fail_threshold:
            c["noGo"] = True
    else:
        c["consecutivePasses"] += 1
        c["consecutiveFailures"] = 0
        if c["noGo"] and c["consecutivePasses"] >= recovery_threshold:
            c["noGo"] = False
    return c


def run_handoff(ctx: Context, fence: state.Fence | None = None) -> dict[str, Any]:
    """Observe the criteria, step their counters, write the handoff snapshot (only while
    ``fence``'s run-lock is still held)."""
    s = ctx.settings
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)  # stale rules compare stored times: the one clock
        states = runs.load_states(conn, now=now)
        prev = states.get(state.HANDOFF, _snapshot_shape)
        live = live_signals(conn, ctx, states)
        counters = _counters(prev.data)
        corrupt = prev.error not in (None, "missing")
        criteria = {}
        for name in CRITERIA:
            c = step(counters[name], failing=live[name]["failing"],
                     fail_threshold=s.handoff_fail_threshold,
                     recovery_threshold=s.recovery_threshold)
            if corrupt and live[name]["failing"]:
                c["noGo"] = True  # its past is unknown: no credit, NO_GO at once
            criteria[name] = {**c, "failing": live[name]["failing"],
                              "detail": live[name]["detail"]}
        verdict = NO_GO if any(c["noGo"] for c in criteria.values()) else GO
        valid = all(v["readable"] for v in live.values())
        snapshot: dict[str, Any] = {"state": verdict, "snapshotValid": valid,
                                    "criteria": criteria, "generatedAt": to_ms(now)}
        if corrupt:
            snapshot.update(stateRecoveredAt=to_ms(now), stateError=prev.error)
        if fence is not None:
            fence.check("the handoff snapshot")
        state.write(conn, name=state.HANDOFF, data=snapshot, now=now)
        if corrupt:
            store.insert_event(conn, kind="check_state_recovered", at=now,
                               actor="handoff_health", reason=str(prev.error)[:200],
                               data={"state": state.HANDOFF, "error": prev.error,
                                     "verdict": verdict})
    return {"ok": True, "state": verdict, "snapshotValid": valid, "criteria": criteria,
            "generatedAt": iso(now), "previousStateError": prev.error if corrupt else None,
            "stateRecoveredAt": iso(from_ms(to_ms(now))) if corrupt else None}


def _snapshot_shape(d: Any) -> str | None:
    if d.get("state") not in (GO, NO_GO):
        return "state must be GO or NO_GO"
    if not isinstance(d.get("snapshotValid"), bool):
        return "snapshotValid must be a boolean"
    if not isinstance(d.get("criteria"), dict):
        return "criteria must be an object"
    return None


def snapshot_view(conn: Connection, ctx: Context, states: state.States) -> dict[str, Any]:
    """The handoff snapshot through the stale rule (SPEC 4.4): older than
    ``handoff_stale_after_s`` it is ``stale``, ``snapshotValid`` is forced true and the
    live-computed signals decide ``state``; a missing or unreadable one says so."""
    now = states.now
    r = states.get(state.HANDOFF, _snapshot_shape)
    out: dict[str, Any] = {"state": None, "snapshotValid": None, "stale": False,
                           "generatedAt": iso(r.written_at), "ageMs": None,
                           "error": r.error, "criteria": {}, "stateRecoveredAt": None,
                           "stateError": None}
    if r.data is None:
        return out
    recovered = r.data.get("stateRecoveredAt")
    if isinstance(recovered, int):  # the run before started again from corrupt state
        out.update(stateRecoveredAt=iso(from_ms(recovered)),
                   stateError=str(r.data.get("stateError")))
    age_s = r.age_s(now) or 0.0
    out.update(state=r.data["state"], snapshotValid=r.data["snapshotValid"],
               criteria=r.data["criteria"], ageMs=int(age_s * 1000),
               generatedAt=iso(from_ms(r.data["generatedAt"]))
               if isinstance(r.data.get("generatedAt"), int) else iso(r.written_at))
    if age_s > ctx.settings.handoff_stale_after_s:
        live = live_signals(conn, ctx, states)
        out.update(stale=True, snapshotValid=True,
                   snapshotState=r.data["state"],
                   state=NO_GO if any(v["failing"] for v in live.values()) else GO,
                   live={k: {"failing": v["failing"], "detail": v["detail"]}
                         for k, v in live.items()})
    return out
