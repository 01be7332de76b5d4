"""The task lifecycle around the lane operations (SPEC 4.11): attempts and ``dead``,
backoff, cancel, requeue, the task list, a lane's lifecycle settings.

A failed task goes back to ``todo`` claimable from ``not_before = now + min(cap, base *
2^attempts) * (1 +- jitter)`` (``attempts`` counted before this failure), or ends ``dead``
when it has failed its lane's ``max_attempts`` times. Both claim paths skip a task not yet
due (``store.claim_next`` on SQLite, ``autonomy_claim`` on PostgreSQL, migration 0006).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from app import principal, validate, wire
from app.errors import InvalidInput, NotDead, TaskFinished, TaskNotFound
from app.settings import Settings
from app.storage import leases, pickup, store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import TaskStatus


def lane_max_attempts(lane: Mapping[Any, Any], s: Settings) -> int:
    """The lane's ``max_attempts``, or the setting's default."""
    got = lane.get("max_attempts")
    return int(got) if got is not None else s.default_max_attempts


def backoff_delay_s(*, attempts: int, base_s: float, cap_s: float, jitter: float,
                    rand: Callable[[], float] = random.random) -> float:
    """``min(cap, base * 2^attempts)`` stretched or shrunk by up to ``jitter`` (a fraction)
    at random, so a batch that failed together does not come back together."""
    delay = min(cap_s, base_s * 2.0 ** min(attempts, 60))
    return max(0.0, delay * (1.0 + jitter * (2.0 * rand() - 1.0)))


def after_failure(task: Mapping[Any, Any], lane: Mapping[Any, Any], s: Settings,
                  now: datetime) -> tuple[str, datetime | None]:
    """Where a failure sends ``task``: ``("dead", None)`` at the lane's ``max_attempts``,
    else ``("todo", not_before)`` after its backoff."""
    attempts = int(task["attempts"])
    if attempts + 1 >= lane_max_attempts(lane, s):
        return TaskStatus.dead.value, None
    base = lane.get("backoff_base_s")
    cap = lane.get("backoff_cap_s")
    delay = backoff_delay_s(attempts=attempts,
                            base_s=s.backoff_base_s if base is None else float(base),
                            cap_s=s.backoff_cap_s if cap is None else float(cap),
                            jitter=s.backoff_jitter)
    return TaskStatus.todo.value, (now + timedelta(seconds=delay) if delay > 0 else None)


def next_due(ctx: Context, *, assignee: str) -> tuple[datetime, float] | None:
    """When the lane's soonest ``todo`` task that is not yet due falls due, and in how
    many seconds by the database's clock (push pickup bounds a waiting claim's wait by
    it, never by this process's clock), or None."""
    with transaction(ctx.engine, write=False) as conn:
        now = ctx.now_in(conn)
        due = store.next_due(conn, assignee=assignee, now=now)
    return None if due is None else (due, (due - now).total_seconds())


def create_due(ctx: Context, *, not_before: Any, delay_s: Any
               ) -> tuple[datetime | None, float | None]:
    """A create's due time, at most one of ``notBefore`` (a time) and ``delayS``
    (seconds): ``(time, None)``, or ``(None, seconds)`` -- the statement that writes the
    task adds those seconds to the database's clock (SPEC 4.9: a creator whose clock is
    off neither delays nor hurries the task) -- or ``(None, None)`` when due at once. A
    ``notBefore`` is the caller's own statement of a time; it is checked against this
    process's clock only to refuse one absurdly far ahead."""
    nb, delay = validate.not_before(not_before), validate.delay_s(delay_s)
    if nb is not None and delay is not None:
        raise InvalidInput("give notBefore or delayS, not both", field="delayS")
    limit = timedelta(seconds=ctx.settings.create_delay_max_s)
    if delay is not None:
        if timedelta(seconds=delay) > limit:
            raise InvalidInput(f"notBefore is more than {ctx.settings.create_delay_max_s:.0f}"
                               " s ahead", field="notBefore")
        return None, (delay if delay > 0 else None)
    now = ctx.clock()
    if nb is None or nb <= now:
        return None, None
    if nb - now > limit:
        raise InvalidInput(f"notBefore is more than {ctx.settings.create_delay_max_s:.0f} s "
                           "ahead", field="notBefore")
    return nb, None


def due_at(now: datetime, delay_s: float | None) -> datetime | None:
    """``now`` (the database's time, ``Context.now_in``) plus a create's ``delayS``."""
    return None if delay_s is None else now + timedelta(seconds=delay_s)


def cancel(ctx: Context, *, task_id: Any, actor: Any = None) -> dict[str, Any]:
    """End a ``todo`` or ``in_progress`` task as ``cancelled`` (an event); the lease
    holder's heartbeat, complete and release then answer ``task_cancelled``. A task
    already cancelled answers ``alreadyCancelled``; a finished one ``task_finished``. A
    cancel racing a complete ends one way: both update the row conditionally under its
    row lock, and the loser sees the winner's status."""
    tid = validate.task_id(task_id)
    # under a credential, no actor given is no note: the credential is the actor
    who = validate.actor(actor, ctx.settings) or (
        "unknown" if principal.current() is None else None)
    refusal: TaskFinished | None = None
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        row = store.get_task(conn, task_id=tid, for_update=True)
        if row is None:
            raise TaskNotFound(f"no task with id {tid}", taskId=tid)
        if row["status"] == TaskStatus.cancelled.value:
            return {"ok": True, "task": wire.task(row), "alreadyCancelled": True}
        done = store.cancel_task(conn, task_id=tid, now=now)
        if done is None:
            refusal = TaskFinished(f"task {tid} is {row['status']}; it can no longer be "
                                   "cancelled", taskId=tid, status=row["status"])
            store.insert_event(conn, kind="cancel_refused", at=now, assignee=row["assignee"],
                               task_id=tid, actor=who, reason=refusal.code,
                               data={"status": row["status"]})
        else:
            store.insert_event(conn, kind="task_cancelled", at=now, assignee=row["assignee"],
                               task_id=tid, actor=who,
                               data={"wasStatus": row["status"],
                                     "claimedBy": row["claimed_by"]})
    if refusal is not None:
        raise refusal
    assert done is not None
    if row["status"] == TaskStatus.in_progress.value:
        leases.drop(ctx, assignee=row["assignee"], worker=row["claimed_by"], task_id=tid,
                    token=row["lease_token"])
        pickup.wake(ctx, assignee=row["assignee"])  # its slot is free for the next task
    return {"ok": True, "task": wire.task(done), "alreadyCancelled": False}


def requeue(ctx: Context, *, task_id: Any, actor: Any = None) -> dict[str, Any]:
    """Bring a ``dead`` task back to ``todo`` with its attempts reset (an event)."""
    tid = validate.task_id(task_id)
    # under a credential, no actor given is no note: the credential is the actor
    who = validate.actor(actor, ctx.settings) or (
        "unknown" if principal.current() is None else None)
    err: NotDead | None = None
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        row = store.get_task(conn, task_id=tid, for_update=True)
        if row is None:
            raise TaskNotFound(f"no task with id {tid}", taskId=tid)
        back = store.requeue_dead(conn, task_id=tid, now=now)
        if back is None:
            err = NotDead(f"task {tid} is {row['status']}, not dead; only a dead task is "
                          "requeued", taskId=tid, status=row["status"])
            store.insert_event(conn, kind="requeue_refused", at=now, assignee=row["assignee"],
                               task_id=tid, actor=who, reason=err.code,
                               data={"status": row["status"]})
        else:
            store.insert_event(conn, kind="task_requeued", at=now, assignee=row["assignee"],
                               task_id=tid, actor=who,
                               data={"attempts": row["attempts"],
                                     "lastValidationReason": row["last_validation_reason"]})
            if not back["lane_paused"]:
                store.notify_lane(conn, assignee=row["assignee"])
    if err is not None:
        raise err
    assert back is not None
    if not back["lane_paused"]:
        pickup.wake(ctx, assignee=back["assignee"])
    return {"ok": True, "task": wire.task(back)}


def list_tasks(ctx: Context, *, assignee: Any = None, status: Any = None, kind: Any = None,
               limit: Any = None, after: Any = None) -> dict[str, Any]:
    """Tasks newest first, filtered by lane, status and kind; a page of ``limit``, the next
    one asked with ``after`` = this answer's ``nextAfter`` (keyset pagination: stable
    while tasks are created)."""
    lane = validate.assignee(assignee, ctx.settings) if assignee is not None else None
    st, kd = validate.task_status(status), validate.task_kind(kind)
    n = validate.list_limit(limit)
    aft = validate.task_id(after, field="after") if after is not None else None
    with transaction(ctx.engine, write=False) as conn:
        rows = store.list_tasks_page(conn, assignee=lane, status=st, kind=kd, after=aft,
                                     limit=n)
    tasks = [wire.task(r) for r in rows]
    return {"ok": True, "tasks": tasks,
            "nextAfter": tasks[-1]["id"] if len(tasks) == n else None}


def lifecycle_values(*, max_attempts: Any, backoff_base_s: Any, backoff_cap_s: Any
                     ) -> dict[str, Any]:
    """A lane's lifecycle settings as given (``configure_lane``), validated."""
    values: dict[str, Any] = {}
    if max_attempts is not None:
        values["max_attempts"] = validate.max_attempts(max_attempts)
    if backoff_base_s is not None:
        values["backoff_base_s"] = validate.backoff_s(backoff_base_s, "backoffBaseS")
    if backoff_cap_s is not None:
        values["backoff_cap_s"] = validate.backoff_s(backoff_cap_s, "backoffCapS")
    return values
