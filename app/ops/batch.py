"""Batched grants and completes (issue 22): a worker's prefetch of K leases.

``claim_many`` grants a worker up to K leases in a lane at once -- each a lease of its
own (token, expiry, heartbeat, fencing), each counted against the lane's
``maxInFlight`` and each with its ``lease_granted`` event -- counting those it already
holds: a worker holding K is answered ``duplicate_claim_guard`` as a worker holding one
is today. ``complete_many`` finishes several leased tasks with success in one statement
and one commit, each fenced by its own token and with its own ``task_completed`` event;
an item that matched nothing (a stale token, a lease that expired, a retry) is answered
alone, as ``complete`` would answer it, without holding back the others; and it may hand
over up to K next leases in the same transaction.

The database decides alone here: the Redis fast path's check and reservation are for one
lease per worker (``leases.check``), so a batched claim goes straight to the database
(whose lane slots keep ``maxInFlight`` exact) and Redis is told afterwards, in one
pipelined round trip, what was granted and what ended (a cache the single claims read).
On PostgreSQL a claim is one call of ``autonomy_claim`` and a complete one call of
``autonomy_complete_many`` (migration 0010); on SQLite each is one transaction.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from app import principal, validate, wire
from app.clock import iso, to_ms
from app.errors import AutonomyError, InvalidInput
from app.ops import lanes
from app.storage import leases, pickup, store
from app.storage.context import Context
from app.storage.db import is_postgres, transaction

ITEMS_MAX = validate.CLAIM_MAX_MAX  # items in one complete_many


def claim(ctx: Context, *, assignee: str, worker: str, max_n: Any, wait_ms: Any = None,
          clock_skew_ms: Any = None) -> dict[str, Any]:
    """``claim`` with the wire's ``max`` (a worker's prefetch K): up to that many leases,
    counting those the worker holds, answered as ``leases`` too; the arguments checked as
    ``lanes.claim`` checks them."""
    s = ctx.settings
    return claim_many(ctx, assignee=validate.assignee(assignee, s),
                      worker=validate.worker(worker, s), max_n=validate.claim_max(max_n),
                      wait_ms=validate.wait_ms(wait_ms, s),
                      skew_ms=validate.clock_skew_ms(clock_skew_ms, s))


def claim_many(ctx: Context, *, assignee: str, worker: str, max_n: int,
               wait_ms: int = 0, skew_ms: int | None = None) -> dict[str, Any]:
    """Up to ``max_n`` leases for ``worker`` (validated input). The answer is ``claim``'s
    (``task`` and ``lease``: the first granted) with ``leases``: every lease granted,
    ``[{task, lease}]``, in claim order. With ``wait_ms``, an empty lane is waited on
    (push pickup) until work arrives or the wait is up."""
    deadline = time.monotonic() + wait_ms / 1000
    while True:
        answer = _claim_now(ctx, assignee=assignee, worker=worker, max_n=max_n,
                            skew_ms=skew_ms)
        left = deadline - time.monotonic()
        if answer.get("task") is not None or left <= 0:
            return answer
        if pickup.wait(ctx, assignee=assignee, timeout_s=left) == "timeout":
            return answer


def _claim_now(ctx: Context, *, assignee: str, worker: str, max_n: int,
               skew_ms: int | None) -> dict[str, Any]:
    tokens = [principal.new_lease_token() for _ in range(max_n)]
    if is_postgres(ctx.engine):
        got = store.claim_pg(ctx.engine, assignee=assignee, worker=worker, tokens=tokens,
                             ttl_s=ctx.settings.lease_ttl_s, test_now=ctx.pinned_now())
        return _answer(ctx, got, assignee=assignee, worker=worker, skew_ms=skew_ms)
    return _answer(ctx, _claim_sqlite(ctx, assignee=assignee, worker=worker, tokens=tokens),
                   assignee=assignee, worker=worker, skew_ms=skew_ms)


def _claim_sqlite(ctx: Context, *, assignee: str, worker: str, tokens: list[str]
                  ) -> store.ClaimRows:
    """SQLite: ``autonomy_claim``'s rules in one write transaction (the database's write
    lock orders every claim): expired leases requeued, the worker's own leases counted
    against its K, the lane's against ``maxInFlight``."""
    out = store.ClaimRows()
    with transaction(ctx.engine) as conn:
        now = out.now = ctx.now_in(conn)
        expires = now + timedelta(seconds=ctx.settings.lease_ttl_s)
        lane = store.get_lane(conn, assignee=assignee, for_update=True)
        if lane is None:
            return out
        if lane["paused"]:
            out.paused = dict(lane)
            return out
        out.lane = dict(lane)
        leased = store.in_progress(conn, assignee=assignee)
        expired = [t for t in leased if t["lease_expires_at"] <= now]
        if expired:
            ids = store.requeue_tasks(conn, task_ids=[t["id"] for t in expired], now=now)
            out.requeued = [dict(t) for t in expired if t["id"] in ids]
            lanes.requeue_events(conn, out.requeued, now=now, actor=f"claim:{worker}")
        live = [t for t in leased if t["lease_expires_at"] > now]
        mine = [t for t in live if t["claimed_by"] == worker]
        room = min(lane["max_in_flight"] - len(live), len(tokens) - len(mine))
        if len(mine) >= len(tokens) or room <= 0:
            held = mine[0] if mine else (live[0] if live else None)
            out.held = dict(held) if held is not None else None
            return out
        for token in tokens[:room]:
            row = store.claim_next(conn, assignee=assignee, worker=worker, token=token,
                                   expires_at=expires, now=now)
            if row is None:
                break
            out.granted.append(dict(row))
        store.insert_events(conn, rows=[
            {"kind": "lease_granted", "at": now, "assignee": assignee, "task_id": r["id"],
             "actor": worker, "data": {"expiresAt": iso(expires)}} for r in out.granted])
    return out


def _answer(ctx: Context, got: store.ClaimRows, *, assignee: str, worker: str,
            skew_ms: int | None, ended: list[leases.Call] | None = None) -> dict[str, Any]:
    """A batched claim's answer from its rows, Redis told what changed -- the leases
    requeued, those granted, and ``ended`` (the drops of a complete before it) -- in one
    round trip."""
    now = got.now or ctx.clock()
    p = principal.current()
    if p is not None and is_postgres(ctx.engine):  # the function wrote the worker as actor
        granted = [r["id"] for r in got.granted] if p.name != worker else []
        requeued = [r["id"] for r in got.requeued]
        if granted or requeued:
            store.restamp_claim_pg(ctx.engine, granted=granted, requeued=requeued, now=now,
                                   worker=worker, actor=p.name)
    calls = [*(ended or []), *leases.drops(
        ctx, [(assignee, r["claimed_by"], r["id"], r["lease_token"]) for r in got.requeued])]
    if got.granted and got.lane is not None and got.paused is None and got.held is None:
        calls += leases.records(
            ctx, assignee=assignee, worker=worker, now_ms=to_ms(now),
            granted=[(r["id"], r["lease_token"], to_ms(r["lease_expires_at"]))
                     for r in got.granted],
            max_in_flight=got.lane["max_in_flight"], metric="claims", skew_ms=skew_ms)
    leases.sync(ctx, calls)
    lanes.made_claimable(ctx, assignee=assignee, n=len(got.requeued))
    if got.paused is not None:
        raise lanes._paused_error(got.paused)
    if got.held is not None:
        return {**lanes._guard(ctx, got.held, worker=worker, layer="db"), "leases": []}
    if not got.granted or got.lane is None:
        return {"ok": True, "task": None, "leases": []}
    out = [{"task": wire.task(r), "lease": {"token": r["lease_token"],
                                            "expiresAt": iso(r["lease_expires_at"])}}
           for r in got.granted]
    return {"ok": True, "task": out[0]["task"], "lease": out[0]["lease"],
            "serverTime": iso(now), "leases": out}


def complete_many(ctx: Context, *, items: Any, actor: str | None = None,
                  claim_next: Any = None, max_n: Any = None,
                  clock_skew_ms: Any = None) -> dict[str, Any]:
    """Finish several leased tasks with success (SPEC 4.2 for each), in one statement and
    one commit. ``items``: ``[{taskId, leaseToken, result?}]``. Answers ``results``, one
    per item in its order: ``{ok: true, task}`` (or the ``duplicate_complete_guard`` of
    a retry), or ``{ok: false, error, message, taskId}`` -- that item's refusal alone
    (a stale token refuses its item, never the others). With ``claim_next``
    (``{assignee, worker}``), ``next`` is that worker's next claim of up to ``max``
    leases (``claim`` with ``max``), on PostgreSQL in the same transaction."""
    s = ctx.settings
    if not isinstance(items, list) or not 1 <= len(items) <= ITEMS_MAX:
        raise InvalidInput(f"items must be a list of 1 to {ITEMS_MAX} objects",
                           field="items")
    parsed: list[tuple[int, str, dict[str, Any] | None]] = []
    for it in items:
        if not isinstance(it, dict):
            raise InvalidInput("each item must be an object with taskId and leaseToken",
                               field="items")
        res = validate.json_object(it.get("result"), s, field="result")
        parsed.append((validate.task_id(it.get("taskId")),
                       validate.lease_token(it.get("leaseToken")), res))
    if len({tid for tid, _, _ in parsed}) != len(parsed):
        raise InvalidInput("items name a task more than once", field="items")
    actor = validate.actor(actor, s)
    nxt = validate.claim_next(claim_next, s)
    k = validate.claim_max(max_n) if max_n is not None else 1
    skew = validate.clock_skew_ms(clock_skew_ms, s)
    results: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, str, dict[str, Any] | None]] = []
    for tid, token, res in parsed:
        try:
            lanes._check_owner(ctx, tid, token, action="complete")
        except AutonomyError as e:
            results[tid] = _refused(tid, e)
            continue
        _, res, redacted = lanes._redacted(None, res)
        if redacted:
            lanes._record_redaction(ctx, tid, redacted)
        todo.append((tid, token, res))
    got: store.ClaimRows | None = None
    done: list[dict[str, Any]] = []
    if todo and is_postgres(ctx.engine):
        done, got = store.complete_many_pg(
            ctx.engine, items=todo, actor=actor,
            assignee=nxt[0] if nxt else None, worker=nxt[1] if nxt else None,
            new_tokens=[principal.new_lease_token() for _ in range(k)] if nxt else [],
            ttl_s=s.lease_ttl_s, test_now=ctx.pinned_now())
    elif todo:
        done = _complete_sqlite(ctx, items=todo, actor=actor)
    ended = leases.drops(ctx, [(r["assignee"], r["claimed_by"], r["id"], r["lease_token"])
                               for r in done])
    if got is None or nxt is None:
        leases.sync(ctx, ended)
        ended = []
    for r in done:
        results[r["id"]] = {"ok": True, "task": wire.task(r)}
    for tid, token, res in todo:  # matched nothing: the guard or refusal, alone
        if tid not in results:
            try:
                results[tid] = lanes.complete(ctx, task_id=tid, lease_token=token,
                                              outcome="success", result=res, actor=actor)
            except AutonomyError as e:
                results[tid] = _refused(tid, e)
    answer: dict[str, Any] = {"ok": True, "results": [results[tid] for tid, _, _ in parsed]}
    if nxt is not None:
        try:
            if got is not None:
                answer["next"] = _answer(ctx, got, assignee=nxt[0], worker=nxt[1],
                                         skew_ms=skew, ended=ended)
            else:
                answer["next"] = claim_many(ctx, assignee=nxt[0], worker=nxt[1], max_n=k,
                                            skew_ms=skew)
        except AutonomyError:  # refused (a paused lane): the worker claims and hears why
            pass
    return answer


def _complete_sqlite(ctx: Context, *, items: list[tuple[int, str, dict[str, Any] | None]],
                     actor: str | None) -> list[dict[str, Any]]:
    """SQLite: the live leases among ``items`` marked done, with their events, in one
    transaction; answers the rows done."""
    done: list[dict[str, Any]] = []
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        for tid, token, res in items:
            row = store.mark_done(conn, task_id=tid, token=token, now=now, result=res)
            if row is not None:
                done.append(dict(row))
        store.insert_events(conn, rows=[
            {"kind": "task_completed", "at": now, "assignee": r["assignee"],
             "task_id": r["id"], "actor": actor or r["claimed_by"]} for r in done])
    return done


def _refused(tid: int, e: AutonomyError) -> dict[str, Any]:
    return {"ok": False, "taskId": tid, "error": e.code, "message": e.message}

