"""The lane operations: create, claim, heartbeat, complete, release, pause, resume.

Each answers a JSON-ready dict with ``ok`` (SPEC section 4) or raises an
``AutonomyError``. The duplicate-claim guard holds at two layers: Redis (``leases.py``,
no database write) and the database transaction (lane row lock + conditional update), and
either alone prevents a double claim.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Generator, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, RowMapping

from app import principal, redact, validate, wire
from app.clock import iso, to_ms
from app.errors import (
    AutonomyError,
    LanePaused,
    NotInProgress,
    StaleLease,
    TaskCancelled,
    TaskNotFound,
)
from app.ops import breaker, lifecycle
from app.storage import leases, pickup, store
from app.storage.context import Context
from app.storage.db import is_postgres, transaction
from app.storage.models import Outcome, TaskKind, TaskStatus

log = logging.getLogger(__name__)


def create(ctx: Context, *, assignee: str, title: str, priority: int | None = None,
           payload: Any = None, actor: str | None = None, dedupe_key: Any = None,
           not_before: Any = None, delay_s: Any = None) -> dict[str, Any]:
    """Queue a task in a lane (the lane row is created on first use).

    ``not_before`` (a time) or ``delay_s`` (seconds) delay it (SPEC 4.11). With
    ``dedupe_key``, a create while the lane has a task with that key (or had one, until
    retention prunes it) answers that task with ``guard: "duplicate_create_guard"`` and
    writes nothing; racing creates with one key make one task (the unique index decides)."""
    s = ctx.settings
    a = validate.assignee(assignee, s)
    values = {
        "title": validate.title(title, s), "assignee": a, "kind": TaskKind.work.value,
        "status": TaskStatus.todo.value, "priority": validate.priority(priority),
        "payload": validate.json_object(payload, s) or {}, "attempts": 0,
    }
    actor = validate.actor(actor, s)
    key = validate.dedupe_key(dedupe_key)
    due, delay = lifecycle.create_due(ctx, not_before=not_before, delay_s=delay_s)
    if due is not None:
        values["not_before"] = due
    if key is not None:
        return _create_deduped(ctx, values={**values, "dedupe_key": key}, delay_s=delay,
                               actor=actor)
    if is_postgres(ctx.engine):  # one statement, one round trip, the database's clock
        made = store.create_pg(ctx.engine, values=values, now=ctx.pinned_now(), actor=actor,
                               max_in_flight=s.default_max_in_flight, delay_s=delay)
        if made is not None:
            if not made["lane_paused"]:
                made_claimable(ctx, assignee=a)
            return {"ok": True, "task": wire.task(made)}
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        if delay is not None:
            values["not_before"] = lifecycle.due_at(now, delay)
        store.ensure_lane(conn, assignee=a, now=now, max_in_flight=s.default_max_in_flight)
        lane = store.get_lane(conn, assignee=a)
        assert lane is not None
        row = store.insert_task(conn, values={
            **values, "created_at": now, "updated_at": now,
            "lane_paused": bool(lane["paused"]),
            "lane_paused_reason": lane["paused_reason"] if lane["paused"] else None,
            "lane_paused_at": lane["paused_at"] if lane["paused"] else None,
        })
        store.insert_event(conn, kind="task_created", at=now, assignee=a, task_id=row["id"],
                           actor=actor)
        if not lane["paused"]:
            store.notify_lane(conn, assignee=a)
    if not lane["paused"]:
        made_claimable(ctx, assignee=a)
    return {"ok": True, "task": wire.task(row)}


def _create_deduped(ctx: Context, *, values: dict[str, Any], delay_s: float | None,
                    actor: str | None) -> dict[str, Any]:
    """``create`` with a dedupe key: the insert does nothing when ``ux_task_dedupe``
    already holds the key (on PostgreSQL a racing insert waits for the other's commit, on
    SQLite the write lock orders them), and the task that holds it is answered."""
    s = ctx.settings
    a = values["assignee"]
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        if delay_s is not None:
            values = {**values, "not_before": lifecycle.due_at(now, delay_s)}
        store.ensure_lane(conn, assignee=a, now=now, max_in_flight=s.default_max_in_flight)
        lane = store.get_lane(conn, assignee=a)
        assert lane is not None
        row = store.insert_task_deduped(conn, values={
            **values, "created_at": now, "updated_at": now,
            "lane_paused": bool(lane["paused"]),
            "lane_paused_reason": lane["paused_reason"] if lane["paused"] else None,
            "lane_paused_at": lane["paused_at"] if lane["paused"] else None,
        })
        if row is None:
            held = store.get_task_by_dedupe_key(conn, assignee=a, dedupe_key=values["dedupe_key"])
        else:
            store.insert_event(conn, kind="task_created", at=now, assignee=a,
                               task_id=row["id"], actor=actor,
                               data={"dedupeKey": values["dedupe_key"]})
            if not lane["paused"]:
                store.notify_lane(conn, assignee=a)
    if row is None:
        assert held is not None  # the index refused the key: its holder is committed
        leases.bump(ctx, "guard:duplicate_create_guard")
        return {"ok": True, "guard": "duplicate_create_guard", "task": wire.task(held)}
    if not lane["paused"]:
        made_claimable(ctx, assignee=a)
    return {"ok": True, "task": wire.task(row)}


def claim(ctx: Context, *, assignee: str, worker: str, wait_ms: Any = None,
          clock_skew_ms: Any = None) -> dict[str, Any]:
    """Claim the lane's next task under a lease (SPEC 4.1). With ``wait_ms``, a claim
    that finds the lane empty waits up to that long for work (push pickup).
    ``clock_skew_ms``: the worker's clock skew as it measured it, kept with the lease it
    is granted for status and ``/metrics`` (SPEC 4.9); the answer's ``serverTime`` is the
    database's time the claim was decided by. (Up to K leases at once: ``batch.claim``.)"""
    steps = claim_steps(ctx, assignee=assignee, worker=worker, wait_ms=wait_ms,
                        clock_skew_ms=clock_skew_ms)
    a = validate.assignee(assignee, ctx.settings)
    try:
        timeout_s = next(steps)
        while True:
            timeout_s = steps.send(pickup.wait(ctx, assignee=a, timeout_s=timeout_s))
    except StopIteration as done:
        answer: dict[str, Any] = done.value
        return answer


ClaimSteps = Generator[float, str, dict[str, Any]]


def claim_steps(ctx: Context, *, assignee: str, worker: str, wait_ms: Any = None,
                clock_skew_ms: Any = None) -> ClaimSteps:
    """``claim`` as steps, for a caller that waits its own way (the HTTP API awaits
    without a thread per waiter): each ``yield`` asks to wait up to that many seconds for
    a turn on the lane and is sent ``pickup.wait``'s answer (``"wake"``, ``"poll"``,
    ``"due"`` or ``"timeout"``); the generator's return value is the claim's answer. Every
    step between two yields is database and Redis work (run it in a thread). The
    arguments are checked when the first step runs."""
    s = ctx.settings
    a, w = validate.assignee(assignee, s), validate.worker(worker, s)
    wait = validate.wait_ms(wait_ms, s)
    skew = validate.clock_skew_ms(clock_skew_ms, s)
    if not wait:
        return _claim_now(ctx, assignee=a, worker=w, skew_ms=skew)
    return (yield from _claim_waiting(ctx, assignee=a, worker=w, wait_ms=wait, skew_ms=skew))


def _claim_waiting(ctx: Context, *, assignee: str, worker: str, wait_ms: int,
                   skew_ms: int | None = None) -> ClaimSteps:
    """Claim on a wake, or on the lane's safety poll when it is this caller's turn;
    otherwise wait (yield) for a turn (``pickup.wait``: this process's waiters share one
    blocked wait on Redis) until ``wait_ms`` is up. So a fleet waiting on an empty lane
    costs the database one claim per safety period and Redis next to nothing, and a task
    created wakes one waiter within a round trip or two."""
    deadline = time.monotonic() + wait_ms / 1000
    turn = pickup.take_turn(ctx, assignee=assignee)
    due: datetime | None = None  # when the lane's next delayed task falls due
    due_mono = 0.0  # the same instant on this process's monotonic clock
    while True:
        if turn:
            # a waiting claim goes to the database alone (it decides every claim anyway):
            # the safety poll of an empty lane costs Redis nothing, and a woken claim
            # saves the fast path's check, one round trip on the pickup path. While
            # Redis is degraded the fast path's own re-probe schedule decides
            answer = _claim_now(ctx, assignee=assignee, worker=worker, skew_ms=skew_ms,
                                fast_path=ctx.redis_health.degraded)
            if answer.get("task") is not None:
                return answer
            got_due = lifecycle.next_due(ctx, assignee=assignee)
            due = None if got_due is None else got_due[0]
            due_mono = 0.0 if got_due is None else time.monotonic() + got_due[1]
            if got_due is not None:
                pickup.note_due(ctx, assignee=assignee, in_s=got_due[1],
                                due_ms=to_ms(got_due[0]))
        left = deadline - time.monotonic()
        if left <= 0:
            return {"ok": True, "task": None}
        if due is not None and (until_due := due_mono - time.monotonic()) <= left:
            # a task falls due within this wait: wait for a wake until then, then one
            # waiter per due instant claims it
            got = yield max(0.0, until_due)
            if got == "timeout":
                got = "due" if pickup.take_due_turn(ctx, assignee=assignee,
                                                    due_ms=to_ms(due)) else "timeout"
            turn = None if got == "timeout" else got
            due = None
            continue
        got = yield left
        turn = None if got == "timeout" else got


def made_claimable(ctx: Context, *, assignee: str, n: int = 1) -> None:
    """Wake up to ``n`` of the lane's waiting claims (after the commit that made ``n``
    tasks claimable; the NOTIFY fallback went in that transaction: ``store.notify_lane``)."""
    pickup.wake(ctx, assignee=assignee, n=n)


def _claim_now(ctx: Context, *, assignee: str, worker: str, skew_ms: int | None = None,
               fast_path: bool = True) -> dict[str, Any]:
    """Claim the lane's next task now.

    Redis is asked first; its ``PROCEED`` reserves the lane slot for this claim. While
    another claim holds the slot (``CLAIMING``) this one waits for it to land -- then the
    answer is that lease, not a second grant. A refusal Redis suggests is confirmed by a
    database read; when Redis was behind (a lease that ended, a pause that was lifted) it
    is put right and asked again. Past ``claim_reserve_ms`` the database decides alone,
    and so it does at once while Redis is degraded (down, stalled: SPEC 4.7), or when
    ``fast_path`` is False (push pickup's safety poll).
    """
    s = ctx.settings
    a, w = assignee, worker
    deadline = time.monotonic() + s.claim_reserve_ms / 1000
    fast = None
    while fast_path:
        # Redis's suggestion only (each is confirmed, or the database claims and
        # decides), on Redis's clock; the database's decides the lease (SPEC 4.9)
        fast = leases.check(ctx, assignee=a, worker=w)
        if fast is None or fast.code == leases.PROCEED:
            break
        if fast.code != leases.CLAIMING:
            answer = _confirm_fast_path(ctx, fast, assignee=a, worker=w)
            if answer is not None:
                return answer
        if time.monotonic() >= deadline:
            break
        time.sleep(s.claim_wait_poll_ms / 1000)
    granted = False
    try:
        answer = _claim_in_db(ctx, assignee=a, worker=w, skew_ms=skew_ms)
        granted = answer.get("lease") is not None and answer.get("guard") is None
        return answer
    finally:
        if fast is not None and fast.code == leases.PROCEED and not granted:
            leases.unreserve(ctx, assignee=a, worker=w)


def _confirm_fast_path(ctx: Context, fast: leases.FastPath, *, assignee: str, worker: str
                       ) -> dict[str, Any] | None:
    """Check Redis's suggestion against the database (a read, never a write), on the
    database's clock."""
    with transaction(ctx.engine, write=False) as conn:
        now = ctx.now_in(conn)
        lane = store.get_lane(conn, assignee=assignee)
        if lane is None:
            return None
        if lane["paused"]:
            raise _paused_error(lane)
        live = store.live_leases(conn, assignee=assignee, now=now)
    if fast.code == leases.PAUSED:
        leases.set_paused(ctx, assignee=assignee, paused=False, reason=None, paused_at=None)
    held = _held(live, worker=worker, max_in_flight=lane["max_in_flight"])
    if held is None:
        if fast.lease is not None:  # the worker key outlived its lease in the DB
            leases.drop(ctx, assignee=assignee, worker=worker,
                        task_id=int(fast.lease.get("taskId", 0)), token=fast.lease.get("token"))
        live_ids = {t["id"] for t in live}
        for tid in fast.task_ids:  # leases that ended in the DB before Redis heard of it
            if tid not in live_ids:
                leases.drop(ctx, assignee=assignee, worker=None, task_id=tid, token=None)
        return None
    return _guard(ctx, held, worker=worker, layer="redis")


def _claim_in_db(ctx: Context, *, assignee: str, worker: str, skew_ms: int | None = None
                 ) -> dict[str, Any]:
    """The claim's database layer; the database's clock decides every expiry (SPEC 4.9:
    SQLite's, read inside the write transaction)."""
    if is_postgres(ctx.engine):
        return _claim_on_pg(ctx, assignee=assignee, worker=worker, skew_ms=skew_ms)
    s = ctx.settings
    token = principal.new_lease_token()
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        expires = now + timedelta(seconds=s.lease_ttl_s)
        lane = store.get_lane(conn, assignee=assignee, for_update=True)
        if lane is None:
            return {"ok": True, "task": None}
        if lane["paused"]:
            raise _paused_error(lane)
        leased = store.in_progress(conn, assignee=assignee)
        expired = [t for t in leased if t["lease_expires_at"] <= now]
        requeued = []
        if expired:
            ids = store.requeue_tasks(conn, task_ids=[t["id"] for t in expired], now=now)
            requeued = [t for t in expired if t["id"] in ids]
        requeue_events(conn, requeued, now=now, actor=f"claim:{worker}")
        held = _held([t for t in leased if t["lease_expires_at"] > now], worker=worker,
                     max_in_flight=lane["max_in_flight"])
        if held is None:
            row = store.claim_next(conn, assignee=assignee, worker=worker, token=token,
                                   expires_at=expires, now=now)
            if row is not None:
                store.insert_event(conn, kind="lease_granted", at=now, assignee=assignee,
                                   task_id=row["id"], actor=worker,
                                   data={"expiresAt": iso(expires)})
    for r in requeued:
        leases.drop(ctx, assignee=assignee, worker=r["claimed_by"], task_id=r["id"],
                    token=r["lease_token"])
    made_claimable(ctx, assignee=assignee, n=len(requeued))
    if held is not None:
        return _guard(ctx, held, worker=worker, layer="db")
    if row is None:
        return {"ok": True, "task": None}
    leases.record(ctx, assignee=assignee, worker=worker, task_id=row["id"], token=token,
                  expires_ms=to_ms(expires), now_ms=to_ms(now),
                  max_in_flight=lane["max_in_flight"], metric="claims", skew_ms=skew_ms)
    return {"ok": True, "task": wire.task(row), "serverTime": iso(now),
            "lease": {"token": token, "expiresAt": iso(expires)}}


def _claim_on_pg(ctx: Context, *, assignee: str, worker: str, skew_ms: int | None = None
                 ) -> dict[str, Any]:
    """PostgreSQL: the same steps as ``_claim_in_db`` in one call of ``autonomy_claim``
    (one round trip, its own transaction; ``store.claim_pg``), on its clock."""
    got = store.claim_pg(ctx.engine, assignee=assignee, worker=worker,
                         tokens=[principal.new_lease_token()], ttl_s=ctx.settings.lease_ttl_s,
                         test_now=ctx.pinned_now())
    return _claim_answer(ctx, got, assignee=assignee, worker=worker, skew_ms=skew_ms)


def _claim_answer(ctx: Context, got: store.ClaimRows, *, assignee: str, worker: str,
                  skew_ms: int | None = None) -> dict[str, Any]:
    """A claim's answer from ``autonomy_claim``'s rows, Redis told what changed. Its
    times are the database's: the lease's expiry as granted, the clock it answered."""
    now = got.now or ctx.clock()  # the function answers its clock first; never absent
    p = principal.current()
    granted = [r["id"] for r in got.granted] if p is not None and p.name != worker else []
    requeued = [r["id"] for r in got.requeued] if p is not None else []
    if p is not None and (granted or requeued):  # the function wrote the worker as actor
        store.restamp_claim_pg(ctx.engine, granted=granted, requeued=requeued, now=now,
                               worker=worker, actor=p.name)
    for r in got.requeued:
        leases.drop(ctx, assignee=assignee, worker=r["claimed_by"], task_id=r["id"],
                    token=r["lease_token"])
    made_claimable(ctx, assignee=assignee, n=len(got.requeued))
    if got.paused is not None:
        raise _paused_error(got.paused)
    if got.held is not None:
        return _guard(ctx, got.held, worker=worker, layer="db")
    if not got.granted or got.lane is None:
        return {"ok": True, "task": None}
    row = got.granted[0]
    expires = row["lease_expires_at"]
    leases.record(ctx, assignee=assignee, worker=worker, task_id=row["id"],
                  token=row["lease_token"], expires_ms=to_ms(expires), now_ms=to_ms(now),
                  max_in_flight=got.lane["max_in_flight"], metric="claims", skew_ms=skew_ms)
    return {"ok": True, "task": wire.task(row), "serverTime": iso(now),
            "lease": {"token": row["lease_token"], "expiresAt": iso(expires)}}


def _held(live: Any, *, worker: str, max_in_flight: int) -> RowMapping | None:
    """The live lease that refuses this claim: the worker's own, or any when the lane is full."""
    for t in live:
        if t["claimed_by"] == worker:
            return t
    return live[0] if len(live) >= max_in_flight else None


def _guard(ctx: Context, held: Mapping[Any, Any], *, worker: str, layer: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "ok": True, "guard": "duplicate_claim_guard", "task": wire.task(held),
        "leaseHolder": held["claimed_by"], "leaseExpiresAt": iso(held["lease_expires_at"]),
    }
    # a retried claim gets its own lease back -- only under the credential that was
    # granted it: a claim naming another's worker never learns that worker's token
    if held["claimed_by"] == worker and principal.owns_lease(held["lease_token"]):
        answer["lease"] = {"token": held["lease_token"],
                           "expiresAt": iso(held["lease_expires_at"])}
    leases.log_guard(ctx, assignee=held["assignee"], metric="guard:duplicate_claim_guard",
                     entry={"kind": "claim_guard", "at": iso(ctx.clock()), "worker": worker,
                            "taskId": held["id"], "leaseHolder": held["claimed_by"],
                            "layer": layer, **_by()})
    return answer


def _by() -> dict[str, str]:
    """The credential asking, for what the audit trail keeps off the database."""
    p = principal.current()
    return {"by": p.name} if p is not None else {}


def _paused_error(lane: Mapping[Any, Any]) -> LanePaused:
    return LanePaused(f"lane {lane['assignee']!r} is paused: {lane['paused_reason'] or ''}",
                      assignee=lane["assignee"], reason=lane["paused_reason"],
                      pausedAt=iso(lane["paused_at"]))


def requeue_events(conn: Connection, rows: Any, *, now: datetime, actor: str) -> None:
    """One ``lease_requeued`` event per requeued row (claim or self-heal)."""
    store.insert_events(conn, rows=[
        {"kind": "lease_requeued", "at": now, "assignee": r["assignee"], "task_id": r["id"],
         "actor": actor, "reason": "lease expired",
         "data": {"claimedBy": r["claimed_by"], "leaseExpiresAt": iso(r["lease_expires_at"])}}
        for r in rows
    ])


def heartbeat(ctx: Context, *, task_id: Any, lease_token: Any, clock_skew_ms: Any = None
              ) -> dict[str, Any]:
    """Extend a live lease by the database's clock; fenced by its token. ``clock_skew_ms``
    as ``claim`` takes it; the answer's ``serverTime`` as ``claim`` answers it."""
    tid, token = validate.task_id(task_id), validate.lease_token(lease_token)
    skew = validate.clock_skew_ms(clock_skew_ms, ctx.settings)
    _check_owner(ctx, tid, token, action="heartbeat")
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)  # the database's clock extends it (SPEC 4.9)
        expires = now + timedelta(seconds=ctx.settings.lease_ttl_s)
        row = store.get_task(conn, task_id=tid, for_update=True)
        refusal = _refusal(conn, row, tid, token, action="heartbeat")
        if refusal is None:
            store.extend_lease(conn, task_id=tid, token=token, expires_at=expires, now=now)
            lane = store.get_lane(conn, assignee=row["assignee"])  # type: ignore[index]
        else:
            _refusal_event(conn, refusal, row, now=now, action="heartbeat")
    if refusal is not None:
        raise refusal
    assert row is not None and lane is not None
    leases.record(ctx, assignee=row["assignee"], worker=row["claimed_by"], task_id=tid,
                  token=token, expires_ms=to_ms(expires), now_ms=to_ms(now),
                  max_in_flight=lane["max_in_flight"], skew_ms=skew)
    return {"ok": True, "taskId": tid, "serverTime": iso(now),
            "lease": {"token": token, "expiresAt": iso(expires)}}


def _refusal(conn: Connection, row: RowMapping | None, tid: int, token: str, *,
             action: str) -> AutonomyError | None:
    if row is None:
        return TaskNotFound(f"no task with id {tid}", taskId=tid)
    if row["status"] == TaskStatus.cancelled.value:
        return TaskCancelled(f"task {tid} was cancelled; cannot {action}", taskId=tid,
                             status=row["status"])
    if row["status"] != TaskStatus.in_progress.value:
        released = _released_at(conn, tid, token) if row["status"] == "todo" else None
        why = f" (this lease was released at {released})" if released else ""
        return NotInProgress(f"task {tid} is {row['status']}, not in progress{why}; cannot "
                             f"{action}", taskId=tid, status=row["status"])
    if row["lease_token"] != token:
        released = _released_at(conn, tid, token)
        if released is not None:
            return StaleLease(f"the lease token is no longer task {tid}'s: this lease was "
                              f"released at {released} and the task was claimed again; "
                              f"cannot {action}", taskId=tid, leaseEnded="released")
        return StaleLease(f"the lease token is no longer task {tid}'s: its lease expired "
                          f"and the task moved on; cannot {action}", taskId=tid,
                          leaseEnded="expired")
    return None


def lease_tag(token: str) -> str:
    """A lease token's name in the audit trail: enough to recognise it, useless to use."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _released_at(conn: Connection, tid: int, token: str) -> str | None:
    """When this lease of the task was given back (``release``), or None: a refusal
    then says the lease was released rather than that it expired."""
    tag = lease_tag(token)
    for e in store.list_events(conn, task_id=tid, kind="lease_released", limit=50):
        if isinstance(e["data"], dict) and e["data"].get("lease") == tag:
            return iso(e["at"])
    return None


def _done_refusal(row: RowMapping, tid: int, token: str) -> AutonomyError | None:
    """A complete on a done task (SPEC 4.2): the token of the lease that completed it is an
    idempotent retry (None: ``duplicate_complete_guard``); any other is a superseded
    lease's late outcome, refused (``stale_lease``)."""
    if row["lease_token"] == token:
        return None
    return StaleLease(f"task {tid} is done, completed under another lease; this lease was "
                      "superseded and its outcome is not recorded", taskId=tid,
                      status=row["status"])


def _refusal_event(conn: Connection, err: AutonomyError, row: RowMapping | None, *,
                   now: datetime, action: str) -> None:
    if row is None:
        return
    store.insert_event(conn, kind=f"{action}_refused", at=now, assignee=row["assignee"],
                       task_id=row["id"], reason=err.code, data={"status": row["status"]})


def complete(ctx: Context, *, task_id: Any, lease_token: Any, outcome: Any,
             validation_reason: Any = None, result: Any = None,
             actor: str | None = None, claim_next: Any = None,
             clock_skew_ms: Any = None) -> dict[str, Any]:
    """Finish a leased task with success, or with a validation failure (SPEC 4.2).

    ``claim_next`` (``{"assignee": lane, "worker": name}``): once the outcome is recorded,
    claim that worker's next task in the lane too and answer it as ``next`` (what ``claim``
    would answer) -- on PostgreSQL in the same round trip and transaction as the complete.
    ``next`` is left out when that claim was refused (a paused lane, Redis asking to
    wait, ...): the worker then claims as usual and hears why. ``clock_skew_ms`` as
    ``claim`` takes it, kept with that next lease."""
    s = ctx.settings
    tid, token, out = validate.task_id(task_id), validate.lease_token(lease_token), \
        validate.outcome(outcome)
    reason = validate.reason(validation_reason, s, required=out is Outcome.failure)
    res = validate.json_object(result, s, field="result")
    actor = validate.actor(actor, s)
    nxt = validate.claim_next(claim_next, s)
    skew = validate.clock_skew_ms(clock_skew_ms, s)
    _check_owner(ctx, tid, token, action="complete")
    reason, res, redacted = _redacted(reason, res)
    if redacted:
        _record_redaction(ctx, tid, redacted)
    # the combined PostgreSQL path records the credential but has no room for a note of
    # the caller's own actor: such a call takes the two-step path
    noted = actor is not None and principal.audit(actor)[1].get("actorNote") is not None
    if out is Outcome.success and nxt is not None and is_postgres(ctx.engine) \
            and not noted:
        both = _complete_and_claim_on_pg(ctx, tid=tid, token=token, res=res,
                                         actor=actor, assignee=nxt[0], worker=nxt[1],
                                         skew_ms=skew)
        if both is not None:
            answer, claimed = both
            return answer if claimed else _with_next(ctx, answer, nxt, skew)
    elif out is Outcome.success:
        fast = _complete_fast(ctx, tid=tid, token=token, res=res, actor=actor)
        if fast is not None:
            return fast if nxt is None else _with_next(ctx, fast, nxt, skew)
    answer = _complete_full(ctx, tid=tid, token=token, out=out, reason=reason, res=res,
                            actor=actor)
    return answer if nxt is None else _with_next(ctx, answer, nxt, skew)


def _check_owner(ctx: Context, tid: int, token: str, *, action: str) -> None:
    """A lease's heartbeat, complete and release are for the credential it was granted
    to (SPEC 4.10). A token not granted to this one is answered as any other would be
    when it is not the task's live token (``not_in_progress``, ``stale_lease``: it
    learns nothing new); when it is, the call is refused ``forbidden_scope``, an event."""
    p = principal.current()
    if p is None or principal.owns_lease(token):
        return
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        row = store.get_task(conn, task_id=tid)
        if row is not None and row["status"] == TaskStatus.done.value \
                and action == "complete":
            refusal = _done_refusal(row, tid, token)
        else:
            refusal = _refusal(conn, row, tid, token, action=action)
        if refusal is not None:
            _refusal_event(conn, refusal, row, now=now, action=action)
    if refusal is not None:
        raise refusal
    from app.ops import credentials

    raise credentials.refuse(ctx, p, action=action, task_id=tid,
                             assignee=row["assignee"] if row is not None else None,
                             message=f"this lease was not granted to credential {p.name!r}; "
                                     f"cannot {action} task {tid}")


def _redacted(reason: str | None, res: dict[str, Any] | None
              ) -> tuple[str | None, dict[str, Any] | None, dict[str, int]]:
    """The reason and result with secrets taken out (SPEC 4.10), and how many per field."""
    counts: dict[str, int] = {}
    if reason is not None:
        reason, n = redact.redact(reason)
        if n:
            counts["validationReason"] = n
    if res is not None:
        red, n = redact.redact_json(res)
        if n:
            res, counts["result"] = red, n
    return reason, res, counts


def _record_redaction(ctx: Context, tid: int, counts: dict[str, int]) -> None:
    """Count a redaction: the ``secrets_redacted`` counter and a task event."""
    leases.bump(ctx, "secrets_redacted", sum(counts.values()))
    with transaction(ctx.engine) as conn:
        row = store.get_task(conn, task_id=tid)
        if row is not None:
            store.insert_event(conn, kind="secrets_redacted", at=ctx.now_in(conn),
                               assignee=row["assignee"], task_id=tid, actor=None,
                               reason=f"{sum(counts.values())} secret(s) redacted",
                               data={"fields": counts, "count": sum(counts.values())})


def _with_next(ctx: Context, answer: dict[str, Any], nxt: tuple[str, str],
               skew_ms: int | None = None) -> dict[str, Any]:
    """``answer`` with the worker's next claim as ``next``; without, when it is refused."""
    try:
        return {**answer, "next": _claim_now(ctx, assignee=nxt[0], worker=nxt[1],
                                             skew_ms=skew_ms)}
    except AutonomyError:
        return answer


def _complete_full(ctx: Context, *, tid: int, token: str, out: Outcome, reason: str | None,
                   res: dict[str, Any] | None, actor: str | None) -> dict[str, Any]:
    """The complete that reads the row first: a failure (the breaker, its window and the
    backoff on the database's clock), a retry (the guard), a refusal."""
    answer: dict[str, Any]
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        lane = None
        if out is Outcome.failure:  # lock order: lane, then task
            row = store.get_task(conn, task_id=tid)
            if row is not None:
                lane = store.get_lane(conn, assignee=row["assignee"], for_update=True)
        row = store.get_task(conn, task_id=tid, for_update=True)
        if row is not None and row["status"] == TaskStatus.done.value:
            refusal = _done_refusal(row, tid, token)
            if refusal is None:
                answer = {"ok": True, "guard": "duplicate_complete_guard",
                          "task": wire.task(row)}
        else:
            refusal = _refusal(conn, row, tid, token, action="complete")
        if refusal is not None:
            _refusal_event(conn, refusal, row, now=now, action="complete")
        elif row is not None and row["status"] != TaskStatus.done.value:
            answer = _finish(ctx, conn, row=row, lane=lane, token=token, out=out,
                             reason=reason, res=res, now=now, actor=actor)
    if refusal is not None:
        raise refusal
    assert row is not None
    if answer.get("guard"):
        leases.bump(ctx, "guard:duplicate_complete_guard")
        return answer
    leases.drop(ctx, assignee=row["assignee"], worker=row["claimed_by"], task_id=tid,
                token=token)
    if answer.get("pauseReason"):
        leases.set_paused(ctx, assignee=row["assignee"], paused=True,
                          reason=answer["pauseReason"], paused_at=answer["pausedAt"])
    elif answer["task"]["status"] == TaskStatus.todo.value:  # a failure: claimable again
        made_claimable(ctx, assignee=row["assignee"])
    return answer


def _complete_fast(ctx: Context, *, tid: int, token: str, res: dict[str, Any] | None,
                   actor: str | None) -> dict[str, Any] | None:
    """The common case in one conditional UPDATE: the lease is live and the token is the
    task's. None when it matched nothing -- then the full path reads the row and answers
    the guard or the refusal."""
    done: Mapping[Any, Any] | None
    if is_postgres(ctx.engine):  # one statement, one round trip
        done = store.complete_pg(ctx.engine, task_id=tid, token=token,
                                 now=ctx.pinned_now(), result=res, actor=actor)
        if done is None:
            return None
    else:
        with transaction(ctx.engine) as conn:
            now = ctx.now_in(conn)
            done = store.mark_done(conn, task_id=tid, token=token, now=now, result=res)
            if done is None:
                return None
            store.insert_event(conn, kind="task_completed", at=now,
                               assignee=done["assignee"], task_id=tid,
                               actor=actor or done["claimed_by"])
    leases.drop(ctx, assignee=done["assignee"], worker=done["claimed_by"], task_id=tid,
                token=token)
    return {"ok": True, "task": wire.task(done)}


def _complete_and_claim_on_pg(ctx: Context, *, tid: int, token: str,
                              res: dict[str, Any] | None, actor: str | None,
                              assignee: str, worker: str, skew_ms: int | None = None
                              ) -> tuple[dict[str, Any], bool] | None:
    """A worker's cycle in two Redis round trips and one PostgreSQL one: Redis drops the
    lease being completed and checks (and reserves the slot for) the worker's next claim;
    ``autonomy_complete`` completes the task and, when Redis said go (or is degraded),
    claims the next one; Redis records the new lease. Answers the complete's answer
    (with ``next`` when a lease or the guard came of that claim) and whether the claim
    was answered here -- granted, guarded or refused (a paused lane); None when the
    complete matched nothing (the full path answers)."""
    # a suggestion on Redis's clock: the database decides
    fast = leases.handoff(ctx, assignee=assignee, worker=worker, task_id=tid, token=token)
    reserved = fast is not None and fast.code == leases.PROCEED
    claim = fast is None or reserved
    granted = False
    try:
        done, got = store.complete_claim_pg(
            ctx.engine, task_id=tid, token=token, result=res, actor=actor,
            assignee=assignee, worker=worker if claim else None,
            tokens=[principal.new_lease_token()], ttl_s=ctx.settings.lease_ttl_s,
            test_now=ctx.pinned_now())
        if done is None:
            return None
        if done["assignee"] != assignee or done["claimed_by"] != worker:
            leases.drop(ctx, assignee=done["assignee"], worker=done["claimed_by"],
                        task_id=tid, token=token)
        answer: dict[str, Any] = {"ok": True, "task": wire.task(done)}
        if got is None:
            return answer, False
        try:
            answer["next"] = nxt = _claim_answer(ctx, got, assignee=assignee, worker=worker,
                                                 skew_ms=skew_ms)
        except LanePaused:
            return answer, True
        granted = nxt.get("lease") is not None and nxt.get("guard") is None
        return answer, True
    finally:
        if reserved and not granted:
            leases.unreserve(ctx, assignee=assignee, worker=worker)


def _finish(ctx: Context, conn: Connection, *, row: RowMapping, lane: RowMapping | None,
            token: str, out: Outcome, reason: str | None, res: dict[str, Any] | None,
            now: datetime, actor: str | None) -> dict[str, Any]:
    who = actor or row["claimed_by"]
    if out is Outcome.success:
        done = store.mark_done(conn, task_id=row["id"], token=token, now=now, result=res)
        assert done is not None
        store.insert_event(conn, kind="task_completed", at=now, assignee=row["assignee"],
                           task_id=row["id"], actor=who)
        return {"ok": True, "task": wire.task(done)}
    assert lane is not None and reason is not None
    fields = breaker.record_failure(ctx, conn, task=row, lane=lane, reason=reason, result=res,
                                    now=now, actor=who)
    if not fields.get("lanePaused"):
        store.notify_lane(conn, assignee=row["assignee"])
    after = store.get_task(conn, task_id=row["id"])
    assert after is not None
    return {"ok": True, "task": wire.task(after), **fields}


def release(ctx: Context, *, task_id: Any, lease_token: Any, actor: str | None = None
            ) -> dict[str, Any]:
    """Give a lease back without an outcome (a worker shutting down): the task is ``todo``
    again at once instead of waiting for its lease to expire."""
    tid, token = validate.task_id(task_id), validate.lease_token(lease_token)
    actor = validate.actor(actor, ctx.settings)
    _check_owner(ctx, tid, token, action="release")
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)
        row = store.get_task(conn, task_id=tid, for_update=True)
        refusal = _refusal(conn, row, tid, token, action="release")
        if refusal is None:
            store.release_lease(conn, task_id=tid, token=token, now=now)
            store.notify_lane(conn, assignee=row["assignee"])  # type: ignore[index]
            store.insert_event(conn, kind="lease_released", at=now,
                               assignee=row["assignee"],  # type: ignore[index]
                               task_id=tid, actor=actor or row["claimed_by"],  # type: ignore[index]
                               data={"lease": lease_tag(token)})
        else:
            _refusal_event(conn, refusal, row, now=now, action="release")
    if refusal is not None:
        raise refusal
    assert row is not None
    leases.drop(ctx, assignee=row["assignee"], worker=row["claimed_by"], task_id=tid,
                token=token)
    made_claimable(ctx, assignee=row["assignee"])
    return {"ok": True, "taskId": tid, "released": True}
