"""Retention (SPEC 4.11): the periodic ``retention`` job prunes finished tasks (``done``,
``cancelled``, ``dead``) with their events, and failure fingerprint rows, older than
``retention_finished_s``.

It works in small batches, each its own short transaction (``retention_batch`` rows, at
most ``retention_max_batches`` per run), so it never holds a lock a claim waits on:
claims and completes touch live tasks, retention only finished ones (``ix_task_finished``,
rows locked by anyone skipped on PostgreSQL). Each batch's commit is fenced by the run's
lock (``Fence``), and what it pruned is counted in the ``retention`` state -- shown in
status (``retention``) and ``/metrics`` (``autonomy_retention_pruned_*_total``). A dedupe
key lives as long as its task, so a key can be used again once retention pruned it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from app.clock import iso, iso_ms, to_ms
from app.ops.checks import state
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction

STATE = "retention"
KINDS = ("tasks", "events", "fingerprints")


def run_retention(ctx: Context, fence: state.Fence) -> dict[str, Any]:
    """Prune what is older than the retention setting, batch by batch; answers what this
    run pruned, the cutoff, and whether more is left for the next run."""
    s = ctx.settings
    now = ctx.db_now()  # the cutoff compares stored times: the one clock (SPEC 4.9)
    cutoff = now - timedelta(seconds=s.retention_finished_s)
    pruned = dict.fromkeys(KINDS, 0)
    more = False
    for n in range(s.retention_max_batches):
        with transaction(ctx.engine) as conn:
            tasks, events = store.prune_finished_tasks(conn, before=cutoff,
                                                       limit=s.retention_batch)
            fps = store.prune_fingerprints(conn, before=cutoff, limit=s.retention_batch)
            fence.check("a retention batch")
        pruned["tasks"] += tasks
        pruned["events"] += events
        pruned["fingerprints"] += fps
        if tasks < s.retention_batch and fps < s.retention_batch:
            break
        more = n == s.retention_max_batches - 1
    with transaction(ctx.engine) as conn:
        prev = state.read(conn, name=STATE, now=now).data or {}
        totals = {k: int((prev.get("totals") or {}).get(k, 0)) + pruned[k] for k in KINDS}
        fence.check("the retention totals")
        state.write(conn, name=STATE, now=now, data={
            "lastRunAt": to_ms(now), "cutoff": to_ms(cutoff), "lastRun": pruned,
            "more": more, "totals": totals})
        if any(pruned.values()):
            store.insert_event(conn, kind="retention_pruned", at=now, actor="retention",
                               data={**pruned, "cutoff": iso(cutoff)})
    return {"ok": True, "pruned": pruned, "cutoff": iso(cutoff), "more": more,
            "totals": totals}


def retention_view(ctx: Context, conn: Any, now: datetime) -> dict[str, Any]:
    """The ``retention`` part of status: the setting, the last run, totals pruned."""
    r = state.read(conn, name=STATE, now=now)
    d = r.data or {}
    got = d.get("totals")
    totals: dict[str, Any] = got if isinstance(got, dict) else {}
    return {"retentionS": ctx.settings.retention_finished_s,
            "lastRunAt": iso_ms(d.get("lastRunAt")), "cutoff": iso_ms(d.get("cutoff")),
            "lastRun": d.get("lastRun"), "more": bool(d.get("more")),
            "prunedTotal": {k: int(totals.get(k, 0)) for k in KINDS},
            "error": None if r.error == "missing" else r.error}
