"""Batched grants and completes (issue 22): a worker's prefetch of K leases, each a lease
of its own, and several completes in one statement, each fenced by its own token --
on SQLite and PostgreSQL. Racing processes: ``test_racing_prefetchers_*`` below."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from app import ops
from app.clock import FrozenClock
from app.errors import InvalidInput
from app.ops import batch, lane_control, lanes, lifecycle
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import event_table, task_table
from app.workers.client import HttpClient, LocalClient
from app.workers.lane_worker import LaneWorker, ValidationFailed
from app.workers.prefetch import AUTO_MAX, AutoPrefetch
from tests.api_server import client, serve
from tests.conftest import make_settings
from tests.test_race import ENDS, GRANT, lane_peaks, lease_overlaps

LANE = "batch"


def _tasks(ctx: Context, n: int, lane: str = LANE) -> list[int]:
    return [lanes.create(ctx, assignee=lane, title=f"t{i}")["task"]["id"] for i in range(n)]


def _rows(ctx: Context) -> dict[int, tuple[str, str | None]]:
    with transaction(ctx.engine, write=False) as conn:
        got = conn.execute(sa.text("SELECT id, status, claimed_by FROM task ORDER BY id"))
        return {r[0]: (r[1], r[2]) for r in got}


def _events(ctx: Context, kind: str) -> Counter[int]:
    with transaction(ctx.engine, write=False) as conn:
        got = conn.execute(sa.select(event_table.c.task_id)
                           .where(event_table.c.kind == kind)).scalars().all()
    return Counter(int(t) for t in got)


def _items(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"taskId": x["task"]["id"], "leaseToken": x["lease"]["token"]}
            for x in answer["leases"]]


def test_a_claim_with_max_grants_k_leases_each_its_own(ctx: Context) -> None:
    ids = _tasks(ctx, 6)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    got = batch.claim(ctx, assignee=LANE, worker="w1", max_n=4)
    assert [x["task"]["id"] for x in got["leases"]] == ids[:4]
    tokens = {x["lease"]["token"] for x in got["leases"]}
    assert len(tokens) == 4
    assert got["task"]["id"] == ids[0] and got["lease"] == got["leases"][0]["lease"]
    assert all(_rows(ctx)[t] == ("in_progress", "w1") for t in ids[:4])
    assert _events(ctx, "lease_granted") == Counter(ids[:4])


def test_without_max_a_worker_holds_one_lease_as_before(ctx: Context) -> None:
    ids = _tasks(ctx, 3)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    first = lanes.claim(ctx, assignee=LANE, worker="w1")
    assert "leases" not in first and first["task"]["id"] == ids[0]
    again = lanes.claim(ctx, assignee=LANE, worker="w1")
    assert again["guard"] == "duplicate_claim_guard" and again["task"]["id"] == ids[0]
    assert again["lease"]["token"] == first["lease"]["token"]


def test_a_worker_holding_some_is_granted_up_to_k_and_guarded_at_k(ctx: Context) -> None:
    ids = _tasks(ctx, 8)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    batch.claim(ctx, assignee=LANE, worker="w1", max_n=2)
    more = batch.claim(ctx, assignee=LANE, worker="w1", max_n=4)
    assert [x["task"]["id"] for x in more["leases"]] == ids[2:4]
    full = batch.claim(ctx, assignee=LANE, worker="w1", max_n=4)
    assert full["guard"] == "duplicate_claim_guard" and full["leases"] == []
    assert sum(1 for s, _ in _rows(ctx).values() if s == "in_progress") == 4


def test_k_leases_never_pass_max_in_flight(ctx: Context) -> None:
    _tasks(ctx, 10)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=3)
    a = batch.claim(ctx, assignee=LANE, worker="w1", max_n=2)
    b = batch.claim(ctx, assignee=LANE, worker="w2", max_n=5)
    c = batch.claim(ctx, assignee=LANE, worker="w3", max_n=5)
    assert (len(a["leases"]), len(b["leases"])) == (2, 1)
    assert c["guard"] == "duplicate_claim_guard" and "lease" not in c
    assert sum(1 for s, _ in _rows(ctx).values() if s == "in_progress") == 3


def test_a_batch_complete_with_one_stale_token_completes_the_others(ctx: Context) -> None:
    ids = _tasks(ctx, 4)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    got = batch.claim(ctx, assignee=LANE, worker="w1", max_n=4)
    items = _items(got)
    items[1] = {**items[1], "leaseToken": "f" * 32}  # not this task's token
    items[2] = {**items[2], "result": {"n": 2}}
    answer = ops.dispatch(ctx, {"action": "complete_many", "items": items})
    res = answer["results"]
    assert [r["ok"] for r in res] == [True, False, True, True]
    assert res[1]["error"] == "stale_lease" and res[1]["taskId"] == ids[1]
    assert res[2]["task"]["result"] == {"n": 2}
    rows = _rows(ctx)
    assert [rows[t][0] for t in ids] == ["done", "in_progress", "done", "done"]
    assert _events(ctx, "task_completed") == Counter([ids[0], ids[2], ids[3]])
    assert _events(ctx, "complete_refused") == Counter([ids[1]])
    # a retry of the whole batch: the guard for the done ones, the refusal again
    retry = ops.dispatch(ctx, {"action": "complete_many", "items": items})["results"]
    assert [r.get("guard") for r in retry] == ["duplicate_complete_guard", None,
                                               "duplicate_complete_guard",
                                               "duplicate_complete_guard"]
    assert _events(ctx, "task_completed") == Counter([ids[0], ids[2], ids[3]])


def test_a_batch_complete_hands_over_up_to_k_next_leases(ctx: Context) -> None:
    ids = _tasks(ctx, 7)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    got = batch.claim(ctx, assignee=LANE, worker="w1", max_n=3)
    items = _items(got)
    answer = ops.dispatch(ctx, {"action": "complete_many", "items": items[:2], "max": 3,
                                "claimNext": {"assignee": LANE, "worker": "w1"}})
    # w1 still holds ids[2]: two more make its three
    assert [x["task"]["id"] for x in answer["next"]["leases"]] == ids[3:5]
    rows = _rows(ctx)
    assert [rows[t][0] for t in ids] == ["done", "done", "in_progress", "in_progress",
                                         "in_progress", "todo", "todo"]


def test_each_lease_of_a_batch_heartbeats_on_its_own(ctx: Context, clock: FrozenClock) -> None:
    _tasks(ctx, 3)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    got = batch.claim(ctx, assignee=LANE, worker="w1", max_n=3)
    ttl = ctx.settings.lease_ttl_s
    clock.advance(seconds=ttl * 0.8)
    beat = [x for x in got["leases"][:2]]
    for x in beat:
        lanes.heartbeat(ctx, task_id=x["task"]["id"], lease_token=x["lease"]["token"])
    clock.advance(seconds=ttl * 0.5)  # past the third's lease, within the beaten two
    other = batch.claim(ctx, assignee=LANE, worker="w2", max_n=3)
    assert [x["task"]["id"] for x in other["leases"]] == [got["leases"][2]["task"]["id"]]
    answer = ops.dispatch(ctx, {"action": "complete_many", "items": _items(got)})
    assert [r["ok"] for r in answer["results"]] == [True, True, False]


def test_a_worker_that_dies_mid_batch_loses_nothing(ctx: Context, clock: FrozenClock) -> None:
    ids = _tasks(ctx, 5)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    got = batch.claim(ctx, assignee=LANE, worker="dead", max_n=5)
    ops.dispatch(ctx, {"action": "complete_many", "items": _items(got)[:2]})
    # the worker dies here: its three other leases expire and are claimed again
    clock.advance(seconds=ctx.settings.lease_ttl_s + 1)
    again = batch.claim(ctx, assignee=LANE, worker="w2", max_n=5)
    assert [x["task"]["id"] for x in again["leases"]] == ids[2:]
    assert _events(ctx, "lease_requeued") == Counter(ids[2:])
    ops.dispatch(ctx, {"action": "complete_many", "items": _items(again)})
    assert all(s == "done" for s, _ in _rows(ctx).values())
    assert _events(ctx, "task_completed") == Counter(ids)


def test_a_waiting_claim_with_max_is_woken_by_work(ctx: Context) -> None:
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(got=batch.claim(
        ctx, assignee=LANE, worker="w1", max_n=3, wait_ms=20_000)))
    t.start()
    try:
        ids = _tasks(ctx, 2)
    finally:
        t.join(30)
    assert not t.is_alive()
    assert [x["task"]["id"] for x in box["got"]["leases"]] in (ids, ids[:1])


def test_redis_mirrors_a_batch_in_one_round_trip_each_way(ctx: Context) -> None:
    ids = _tasks(ctx, 6)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    zset = ctx.keys.lane_leases(LANE)
    got = batch.claim(ctx, assignee=LANE, worker="w1", max_n=3)
    assert sorted(int(x) for x in ctx.redis.zrange(zset, 0, -1)) == ids[:3]
    nxt = ops.dispatch(ctx, {"action": "complete_many", "items": _items(got), "max": 3,
                             "claimNext": {"assignee": LANE, "worker": "w1"}})["next"]
    assert sorted(int(x) for x in ctx.redis.zrange(zset, 0, -1)) == ids[3:]
    ops.dispatch(ctx, {"action": "complete_many", "items": _items(nxt)})
    assert ctx.redis.zrange(zset, 0, -1) == []
    assert ctx.redis.get(ctx.keys.worker_lease(LANE, "w1")) is None


def test_complete_many_refuses_bad_shapes(ctx: Context) -> None:
    with pytest.raises(InvalidInput):
        ops.dispatch(ctx, {"action": "complete_many", "items": []})
    with pytest.raises(InvalidInput):
        ops.dispatch(ctx, {"action": "complete_many",
                           "items": [{"taskId": 1, "leaseToken": "a" * 32}] * 2})
    with pytest.raises(InvalidInput):
        batch.claim(ctx, assignee=LANE, worker="w1", max_n=0)


def test_over_http_claim_with_max_and_complete_many(ctx: Context) -> None:
    ids = _tasks(ctx, 4)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    with client(ctx) as http:
        got = http.post("/api/autonomy", json={"action": "claim", "assignee": LANE,
                                                "worker": "w1", "max": 2}).json()
        done = http.post("/api/autonomy", json={
            "action": "complete_many", "items": _items(got), "max": 2,
            "claimNext": {"assignee": LANE, "worker": "w1"}})
        bad = http.post("/api/autonomy", json={"action": "claim", "assignee": LANE,
                                                "worker": "w1", "max": 101})
    assert [x["task"]["id"] for x in got["leases"]] == ids[:2]
    assert done.status_code == 200, done.text
    body = done.json()
    assert [r["ok"] for r in body["results"]] == [True, True]
    assert [x["task"]["id"] for x in body["next"]["leases"]] == ids[2:]
    assert bad.status_code == 400


# --- racing processes -----------------------------------------------------------------

RACE_TASKS = 600
RACE_WORKERS = 6
RACE_K = 3
RACE_MAX_IN_FLIGHT = 5


def prefetch_worker(cfg: dict[str, Any], start: Any, out: Any) -> None:
    """Claim K, complete them in one call that hands over the next K, until the lane
    stays empty; report the tasks completed."""
    report: dict[str, Any] = {"worker": cfg["worker"], "completed": [], "refused": 0,
                              "error": None}
    ctx = Context.from_settings(make_settings(cfg["database_url"], cfg["redis_url"],
                                              cfg["prefix"]))
    try:
        start.wait(120)
        empty, held = 0, None
        deadline = time.monotonic() + 300
        while empty < 3 and time.monotonic() < deadline:
            got = held or batch.claim(ctx, assignee=LANE, worker=cfg["worker"],
                                      max_n=RACE_K)
            held = None
            if not got.get("leases"):
                empty += 1 if got.get("guard") is None else 0
                time.sleep(0.01)
                continue
            empty = 0
            answer = ops.dispatch(ctx, {
                "action": "complete_many", "items": _items(got), "max": RACE_K,
                "claimNext": {"assignee": LANE, "worker": cfg["worker"]}})
            for item, r in zip(_items(got), answer["results"], strict=True):
                if r["ok"] and r.get("guard") is None:
                    report["completed"].append(item["taskId"])
                elif not r["ok"]:
                    report["refused"] += 1
            nxt = answer.get("next")
            held = nxt if nxt and nxt.get("leases") else None
    except BaseException as e:  # reported, not raised: the parent asserts on it
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        ctx.close()
        out.put(report)


@pytest.mark.slow
def test_racing_prefetchers_never_pass_max_in_flight_and_do_each_task_once(
        settings: Any, redis_server_url: str, redis_prefix: str) -> None:
    """Six processes, each a prefetch of 3, in a lane of 5: every lease counted, so the
    lane never holds more than 5 live leases (walking the grant and end events in commit
    order), no task is leased twice at once, and each is done exactly once."""
    db_url = settings.database_url
    ctx = Context.from_settings(make_settings(db_url, redis_server_url, redis_prefix))
    mp = multiprocessing.get_context("spawn")
    start, out = mp.Barrier(RACE_WORKERS + 1), mp.Queue()
    procs = [mp.Process(target=prefetch_worker, name=f"pf{i}", args=(
        {"database_url": db_url, "redis_url": redis_server_url, "prefix": redis_prefix,
         "worker": f"pf{i}"}, start, out)) for i in range(RACE_WORKERS)]
    try:
        lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=RACE_MAX_IN_FLIGHT)
        ids = _tasks(ctx, RACE_TASKS)
        for p in procs:
            p.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(120)
        reports = [out.get(timeout=400) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    try:
        assert [r["error"] for r in reports] == [None] * RACE_WORKERS
        completed = Counter(t for r in reports for t in r["completed"])
        with transaction(ctx.engine, write=False) as conn:
            statuses = Counter(s for (s,) in conn.execute(sa.select(task_table.c.status)))
            events = conn.execute(
                sa.select(event_table.c.id, event_table.c.kind, event_table.c.assignee,
                          event_table.c.task_id, event_table.c.actor)
                .where(event_table.c.kind.in_((GRANT, *ENDS)))
                .order_by(event_table.c.id)).mappings().all()
        print(f"\n[prefetch race] per process {[len(r['completed']) for r in reports]} "
              f"peaks {lane_peaks(events)} refused {sum(r['refused'] for r in reports)}")
        assert statuses == Counter({"done": RACE_TASKS})
        assert sorted(completed) == sorted(ids) and max(completed.values()) == 1
        assert _events(ctx, "task_completed") == Counter(ids)
        overlaps, after_done = lease_overlaps(events)
        assert overlaps == [] and after_done == []
        assert lane_peaks(events)[LANE] <= RACE_MAX_IN_FLIGHT
        assert sum(1 for r in reports if r["completed"]) >= 2  # they really raced
    finally:
        ctx.close()


# --- LaneWorker(prefetch=K) -----------------------------------------------------------


def test_a_prefetching_worker_runs_each_task_once_in_batches(ctx: Context) -> None:
    ids = _tasks(ctx, 10)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    ran: list[int] = []
    calls: list[str] = []

    class Counting(LocalClient):
        def call(self, request: dict[str, Any]) -> dict[str, Any]:
            calls.append(request["action"])
            return super().call(request)

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        ran.append(task["id"])
        if task["id"] == ids[4]:
            raise ValidationFailed("no tests")
        return {"id": task["id"]}

    worker = LaneWorker(LANE, handler, worker_name="w1", client=Counting(ctx),
                        say=lambda _line: None, prefetch=4)
    stats = worker.run(threading.Event(), max_tasks=10, handle_signals=False)
    assert sorted(ran) == ids and len(ran) == 10
    assert (stats.succeeded, stats.failed, stats.claimed) == (9, 1, 10)
    rows = _rows(ctx)
    assert [rows[t][0] for t in ids] == ["done"] * 4 + ["todo"] + ["done"] * 5
    assert _events(ctx, "task_completed") == Counter(t for t in ids if t != ids[4])
    # one claim, then each batch's complete hands over the next (the failure alone)
    assert calls.count("claim") == 1 and calls.count("complete_many") == 3, calls


def test_a_prefetching_worker_stopping_gives_back_what_it_did_not_run(ctx: Context) -> None:
    ids = _tasks(ctx, 5)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    stop = threading.Event()

    def handler(task: dict[str, Any]) -> None:
        stop.set()  # the stop lands while the first of the batch runs

    worker = LaneWorker(LANE, handler, worker_name="w1", client=LocalClient(ctx),
                        say=lambda _line: None, prefetch=3)
    stats = worker.run(stop, handle_signals=False)
    rows = _rows(ctx)
    assert [rows[t][0] for t in ids] == ["done", "todo", "todo", "todo", "todo"]
    assert (stats.succeeded, stats.released) == (1, 2)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_a_task_cancelled_while_its_handler_runs_counts_as_cancelled_not_lost(
        ctx: Context, prefetch: int) -> None:
    """The complete (one task's, or a batch's item) is refused ``task_cancelled``: the
    worker counts a cancel, as the SDK's does, not a lost lease."""
    ids = _tasks(ctx, 3)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    lines: list[str] = []
    stop = threading.Event()

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        if task["id"] == ids[0]:  # cancelled while it runs; no heartbeat is due to see it
            assert lifecycle.cancel(ctx, task_id=ids[0], actor="alice")["task"]["status"] \
                == "cancelled"
        if task["id"] == ids[-1]:
            stop.set()
        return {"id": task["id"]}

    worker = LaneWorker(LANE, handler, worker_name="w1", client=LocalClient(ctx),
                        say=lines.append, prefetch=prefetch, heartbeat_interval_s=60)
    stats = worker.run(stop, handle_signals=False)
    assert (stats.cancelled, stats.lost, stats.succeeded) == (1, 0, 2), stats
    assert [_rows(ctx)[t][0] for t in ids] == ["cancelled", "done", "done"]
    assert any(f"task {ids[0]}: outcome refused (task_cancelled)" in line
               for line in lines), lines


def test_a_prefetched_task_cancelled_before_its_turn_counts_as_cancelled_and_never_runs(
        ctx: Context) -> None:
    ids = _tasks(ctx, 3)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    lines: list[str] = []
    ran: list[int] = []
    stop = threading.Event()
    worker: LaneWorker

    def handler(task: dict[str, Any]) -> None:
        ran.append(task["id"])
        if task["id"] == ids[0]:  # the second waits its turn; its heartbeat hears the cancel
            lifecycle.cancel(ctx, task_id=ids[1], actor="alice")
            deadline = time.monotonic() + 10
            while not any(b.job.task_id == ids[1] and b.job.cancelled.is_set()
                          for b in worker._queued):
                assert time.monotonic() < deadline, f"no heartbeat heard the cancel: {lines}"
                time.sleep(0.01)
        if task["id"] == ids[-1]:
            stop.set()

    worker = LaneWorker(LANE, handler, worker_name="w1", client=LocalClient(ctx),
                        say=lines.append, prefetch=3, heartbeat_interval_s=0.05)
    stats = worker.run(stop, handle_signals=False)
    assert ran == [ids[0], ids[2]]
    assert (stats.cancelled, stats.lost, stats.succeeded) == (1, 0, 2), stats
    assert any(f"task {ids[1]}: cancelled before its turn; not run" in line
               for line in lines), lines


def test_a_prefetching_worker_heartbeats_the_leases_waiting_their_turn(
        database_url: str, redis_server_url: str, redis_prefix: str) -> None:
    """A lease of 1.5 s, four tasks of 0.5 s each: the last waits 1.5 s for its turn,
    and its lease is live when it starts, because every lease is heartbeaten."""
    rctx = Context.from_settings(make_settings(database_url, redis_server_url,
                                               redis_prefix, lease_ttl_s=1.5))
    try:
        ids = _tasks(rctx, 4)
        lane_control.configure_lane(rctx, assignee=LANE, max_in_flight=10)
        left: dict[int, float] = {}

        def handler(task: dict[str, Any]) -> None:
            with transaction(rctx.engine, write=False) as conn:
                now = rctx.now_in(conn)
                row = conn.execute(sa.select(task_table.c.lease_expires_at)
                                   .where(task_table.c.id == task["id"])).scalar_one()
            expires = row if row.tzinfo else row.replace(tzinfo=now.tzinfo)
            left[task["id"]] = (expires - now).total_seconds()
            time.sleep(0.5)  # the task's work

        worker = LaneWorker(LANE, handler, worker_name="w1", client=LocalClient(rctx),
                            say=lambda _line: None, prefetch=4)
        stats = worker.run(threading.Event(), max_tasks=4, handle_signals=False)
        assert stats.succeeded == 4, stats
        assert sorted(left) == ids and min(left.values()) > 0, left
        assert _events(rctx, "task_completed") == Counter(ids)
    finally:
        rctx.close()


def test_a_prefetching_worker_over_http(ctx: Context) -> None:
    ids = _tasks(ctx, 7)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    ran: list[int] = []
    with serve(ctx) as server:
        http = HttpClient(server.url, settings=ctx.settings, timeout_s=10)
        try:
            worker = LaneWorker(LANE, lambda task: ran.append(task["id"]), worker_name="h1",
                                client=http, say=lambda _line: None, prefetch=3)
            stats = worker.run(threading.Event(), max_tasks=7, handle_signals=False)
        finally:
            http.close()
    assert sorted(ran) == ids and stats.succeeded == 7
    assert _events(ctx, "task_completed") == Counter(ids)


# --- prefetch="auto": K follows the handler's run time -------------------------------


def test_auto_prefetch_claims_what_its_handler_runs_in_about_50_ms() -> None:
    auto = AutoPrefetch()
    assert auto.k() == 1  # nothing measured yet: one lease
    for _ in range(30):
        auto.observe(0.0002)
    assert auto.k() == AUTO_MAX  # short tasks: the cap
    for _ in range(30):
        auto.observe(0.01)
    assert auto.k() == 6  # the last of 6 waits 5 tasks of 10 ms
    for _ in range(30):
        auto.observe(0.2)
    assert auto.k() == 1  # a task longer than the wait: never prefetched


@pytest.mark.parametrize("bad", ["lots", "", 0, 101, -1, 2.5, True, None])
def test_a_prefetch_that_is_neither_auto_nor_k_is_refused(ctx: Context, bad: Any) -> None:
    with pytest.raises(InvalidInput, match="prefetch must be 'auto' or an integer") as e:
        LaneWorker(LANE, lambda task: None, client=LocalClient(ctx), prefetch=bad)
    assert e.value.details == {"field": "prefetch"}


class _Asking(LocalClient):
    """A LocalClient that records each request's action and its ``max``."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.asked: list[tuple[str, Any, int]] = []  # action, max, items

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.asked.append((request["action"], request.get("max"),
                           len(request.get("items") or ())))
        return super().call(request)


def test_an_auto_worker_batches_short_tasks_and_runs_each_once(ctx: Context) -> None:
    ids = _tasks(ctx, 40)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=20)
    ran: list[int] = []
    client = _Asking(ctx)
    worker = LaneWorker(LANE, lambda task: ran.append(task["id"]), worker_name="w1",
                        client=client, say=lambda _line: None, prefetch="auto")
    stats = worker.run(threading.Event(), max_tasks=40, handle_signals=False)
    assert sorted(ran) == ids and stats.succeeded == 40, (ran, stats)
    assert _events(ctx, "task_completed") == Counter(ids)
    assert _events(ctx, "lease_granted") == Counter(ids)
    # the first claim is a plain one (nothing measured); then the completes carry batches
    assert client.asked[0][:2] == ("claim", None), client.asked
    batches = [n for action, _max, n in client.asked if action == "complete_many"]
    assert batches and max(batches) > 1, client.asked
    assert sum(batches) + sum(1 for a in client.asked if a[0] == "complete") == 40


def test_an_auto_worker_does_not_prefetch_tasks_longer_than_its_wait(ctx: Context) -> None:
    ids = _tasks(ctx, 4)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    client = _Asking(ctx)

    def handler(task: dict[str, Any]) -> None:
        time.sleep(0.06)  # longer than AUTO_WAIT_S: a second lease would wait past it

    worker = LaneWorker(LANE, handler, worker_name="w1", client=client,
                        say=lambda _line: None, prefetch="auto")
    stats = worker.run(threading.Event(), max_tasks=4, handle_signals=False)
    assert stats.succeeded == 4 and _events(ctx, "task_completed") == Counter(ids)
    assert {a for a, _max, _n in client.asked} <= {"claim", "complete"}, client.asked
    assert all(m is None for _a, m, _n in client.asked), client.asked


def test_an_auto_workers_wait_is_a_setting(database_url: str, redis_server_url: str,
                                           redis_prefix: str) -> None:
    """``worker_prefetch_auto_wait_ms`` of 1 s: tasks of 60 ms, which the default 50 ms
    never prefetches, are claimed in batches."""
    rctx = Context.from_settings(make_settings(database_url, redis_server_url, redis_prefix,
                                               worker_prefetch_auto_wait_ms=1000))
    try:
        ids = _tasks(rctx, 8)
        lane_control.configure_lane(rctx, assignee=LANE, max_in_flight=10)
        client = _Asking(rctx)
        worker = LaneWorker(LANE, lambda task: time.sleep(0.06), worker_name="w1",
                            client=client, say=lambda _line: None, prefetch="auto")
        stats = worker.run(threading.Event(), max_tasks=8, handle_signals=False)
        assert stats.succeeded == 8 and _events(rctx, "task_completed") == Counter(ids)
        assert any(a == "complete_many" and n > 1 for a, _m, n in client.asked), client.asked
    finally:
        rctx.close()


def test_an_auto_workers_wait_is_at_most_its_heartbeat_period(ctx: Context) -> None:
    """Tasks of 40 ms, which the default wait (50 ms) pairs, with a heartbeat every 20 ms:
    a waiting lease would wait past a heartbeat period, so none is prefetched."""
    ids = _tasks(ctx, 5)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=10)
    client = _Asking(ctx)
    worker = LaneWorker(LANE, lambda task: time.sleep(0.04), worker_name="w1", client=client,
                        say=lambda _line: None, prefetch="auto", heartbeat_interval_s=0.02)
    stats = worker.run(threading.Event(), max_tasks=5, handle_signals=False)
    assert stats.succeeded == 5 and _events(ctx, "task_completed") == Counter(ids)
    assert all(m is None for _a, m, _n in client.asked), client.asked


def test_an_auto_worker_whose_tasks_slow_down_runs_what_it_holds_then_takes_one(
        ctx: Context) -> None:
    """K falls from 10 to 1 mid-drain: the leases already handed over are run (none is
    dropped or left to expire), then the claims are plain again."""
    ids = _tasks(ctx, 30)
    lane_control.configure_lane(ctx, assignee=LANE, max_in_flight=20)
    client = _Asking(ctx)
    ran: list[int] = []

    def handler(task: dict[str, Any]) -> None:
        ran.append(task["id"])
        if len(ran) > 12:
            time.sleep(0.06)

    worker = LaneWorker(LANE, handler, worker_name="w1", client=client,
                        say=lambda _line: None, prefetch="auto")
    stats = worker.run(threading.Event(), max_tasks=30, handle_signals=False)
    assert sorted(ran) == ids and stats.succeeded == 30 and stats.lost == 0, stats
    assert _events(ctx, "task_completed") == Counter(ids)
    assert _events(ctx, "lease_granted") == Counter(ids)
    assert any(a == "complete_many" and n > 1 for a, _m, n in client.asked), client.asked
    assert client.asked[-1][:2] == ("complete", None), client.asked[-8:]
