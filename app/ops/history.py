"""A task's or a lane's history: the audit events, plus the refused duplicate claims that
Redis keeps off the database; and the recent tasks the panel and the API list."""

from __future__ import annotations

from typing import Any

from app import validate, wire
from app.errors import InvalidInput, RedisUnavailable, TaskNotFound
from app.storage import leases, store
from app.storage.context import Context
from app.storage.db import transaction


def history(ctx: Context, *, task_id: Any = None, assignee: Any = None,
            limit: int = 200) -> dict[str, Any]:
    """Events for a task (``taskId``) or a lane (``assignee``), newest first."""
    if (task_id is None) == (assignee is None):
        raise InvalidInput("give exactly one of taskId or assignee")
    with transaction(ctx.engine, write=False) as conn:
        if task_id is not None:
            tid = validate.task_id(task_id)
            task = store.get_task(conn, task_id=tid)
            if task is None:
                raise TaskNotFound(f"no task with id {tid}", taskId=tid)
            lane_name = task["assignee"]
            rows = store.list_events(conn, task_id=tid, limit=limit)
        else:
            lane_name = validate.assignee(assignee, ctx.settings)
            tid = None
            rows = store.list_events(conn, assignee=lane_name, limit=limit)
    events = [wire.event(r) for r in rows]
    try:
        guards = leases.guard_log(ctx, assignee=lane_name, limit=limit)
    except RedisUnavailable:
        guards = []
    if tid is not None:
        guards = [g for g in guards if g.get("taskId") == tid]
    # under credentials the actor is the credential ("by"), the worker named a note
    events.extend({"id": None, "at": g.get("at"), "kind": "claim_guard",
                   "assignee": lane_name, "taskId": g.get("taskId"),
                   "actor": g.get("by") or g.get("worker"),
                   "actorNote": g.get("worker") if g.get("by") else None,
                   "reason": "duplicate_claim_guard", "data": g} for g in guards)
    events.sort(key=lambda e: (e["at"] or "", e["id"] or 0), reverse=True)
    return {"ok": True, "events": events[:limit]}


def recent_events(ctx: Context, *, limit: int = 20) -> list[dict[str, Any]]:
    """The newest events of every lane (the panel's), newest first, as ``history``
    answers them: ``actor`` the credential, ``actorNote`` what the caller said."""
    with transaction(ctx.engine, write=False) as conn:
        rows = store.list_events(conn, limit=limit)
    return [wire.event(r) for r in rows]


def recent_tasks(ctx: Context, *, assignee: str | None = None, status: str | None = None,
                 limit: int = 50) -> list[dict[str, Any]]:
    """The newest tasks, optionally of one lane or status, as the API shows them."""
    with transaction(ctx.engine, write=False) as conn:
        rows = store.list_tasks(conn, assignee=assignee, status=status, limit=limit)
    return [wire.task(r) for r in rows]
