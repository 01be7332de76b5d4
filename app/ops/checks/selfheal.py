"""Self-heal: requeue tasks whose lease expired and release run-locks whose holder is gone.

A lock over budget whose holder still beats is reported in ``runningLocks``, never broken.
The summary (what was requeued, which locks were released, which are running) is persisted
as the ``self_heal`` state and shown in the status payload.
"""

from __future__ import annotations

from typing import Any

from app.clock import iso, to_ms
from app.ops import lanes
from app.ops.checks import state
from app.storage import leases, locks, store
from app.storage.context import Context
from app.storage.db import transaction

ACTOR = "self_heal"
SELF_HEAL_JOB = "self_heal"  # its run-lock's job name


def run_self_heal(ctx: Context, fence: state.Fence | None = None) -> dict[str, Any]:
    """Requeue expired leases, break dead holders' run-locks; answers the summary. Each
    side effect and the summary happen only while ``fence``'s run-lock is still held."""
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)  # the one clock decides what expired (SPEC 4.9)
        if fence is not None:
            fence.check("the requeue of expired leases")
        rows = store.requeue_expired(conn, now=now)
        lanes.requeue_events(conn, rows, now=now, actor=ACTOR)
        for a in {r["assignee"] for r in rows}:
            store.notify_lane(conn, assignee=a)
    for r in rows:  # the Redis lease cache forgets them (best effort; the DB decided)
        leases.drop(ctx, assignee=r["assignee"], worker=r["claimed_by"], task_id=r["id"],
                    token=r["lease_token"])
    for a in {r["assignee"] for r in rows}:
        lanes.made_claimable(ctx, assignee=a, n=sum(r["assignee"] == a for r in rows))
    if fence is not None:
        fence.check("the release of dead run-locks")
    broken = locks.break_dead_locks(ctx)
    running = locks.collect_run_locks(ctx)
    summary = {"requeued": [r["id"] for r in rows],
               "locksReleased": [_released(b) for b in broken],
               "runningLocks": running}
    with transaction(ctx.engine) as conn:
        if fence is not None:
            fence.check("the self-heal summary")
        state.write(conn, name=state.SELF_HEAL, now=now,
                    data={**summary, "ranAt": to_ms(now)})
        store.insert_events(conn, rows=[
            {"kind": "run_lock_broken", "at": now, "actor": ACTOR,
             "reason": "holder stopped beating", "data": b} for b in summary["locksReleased"]])
    return {"ok": True, "lastRunAt": iso(now), **summary}


def break_own_dead_lock(ctx: Context) -> bool:
    """Self-heal's own run-lock, held by a holder that stopped beating (a self-heal killed
    mid-run), is broken like any dead holder's and the break is an event; True when broken
    (the caller takes the lock and runs). A holder that still beats is left alone."""
    broken = locks.break_if_dead(ctx, SELF_HEAL_JOB)
    if broken is None:
        return False
    with transaction(ctx.engine) as conn:
        store.insert_event(conn, kind="run_lock_broken", at=ctx.clock(), actor=ACTOR,
                           reason="holder stopped beating",
                           data=_released(broken))
    return True


def _released(lock: dict[str, Any]) -> dict[str, Any]:
    """A broken lock as the summary and its ``run_lock_broken`` event tell it."""
    return {k: lock[k] for k in ("job", "holder", "elapsedMs", "budgetMs")}


def selfheal_view(states: state.States) -> dict[str, Any]:
    """The last self-heal summary for the status payload."""
    r = states.get(state.SELF_HEAL,
                   state.fields(requeued=list, locksReleased=list, runningLocks=list))
    out: dict[str, Any] = {"lastRunAt": iso(r.written_at), "requeued": [],
                           "locksReleased": [], "runningLocks": [],
                           "error": None if r.error == "missing" else r.error}
    if r.data is not None:
        out.update(requeued=r.data["requeued"], locksReleased=r.data["locksReleased"],
                   runningLocks=r.data["runningLocks"])
    return out
