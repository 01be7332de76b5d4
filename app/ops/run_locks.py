"""Run-locks and the beat leader lease as the faces see them (SPEC 4.5, 4.6).

The CLI, the Celery app and its tasks list the held run-locks, name a holder and lead beat
through these, not through ``app.storage.locks`` / ``app.storage.beat_guard`` directly.
"""

from __future__ import annotations

from typing import Any

from app.storage import beat_guard, leader, locks
from app.storage.context import Context


def held(ctx: Context) -> list[dict[str, Any]]:
    """Every held run-lock (job, holder, startedAt, elapsedMs, budgetMs, overBudget,
    holderAlive), as the status payload lists them."""
    return locks.collect_run_locks(ctx)


def view(ctx: Context) -> dict[str, Any]:
    """The held run-locks and the beat leader lease: what the status payload, ``celery
    inspect run_locks``, the worker's stats in Flower and ``autonomy locks`` all show."""
    locks_held = held(ctx)
    return {"runLocks": locks_held, "runLocksCount": len(locks_held),
            "beat": leader.view(ctx)}


def break_dead(ctx: Context) -> list[dict[str, Any]]:
    """Release every run-lock whose holder stopped beating (as self-heal does); answers
    the ones released. ``autonomy up`` calls it before its first checks, so a lock left by
    a run killed with the last stop cannot hold up self-heal itself."""
    return locks.break_dead_locks(ctx)


def holder_name(kind: str) -> str:
    """The holder string a process of ``kind`` (``cli``, ``celery``, ...) takes locks as."""
    return locks.default_holder(kind)


def lead_beat(ctx: Context) -> None:
    """Lead beat, or stand by until the leader's lease is free (see ``beat_guard.lead``)."""
    beat_guard.lead(ctx)


def beat_may_send(ctx: Context) -> bool:
    """May this beat send its due jobs now (it leads on a recently confirmed lease)?"""
    return beat_guard.may_send(ctx)
