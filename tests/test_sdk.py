"""The worker SDK (``sdk/python``, ``autonomy_client``) against a real server: uvicorn on a
loopback port over a real database and Redis. The SDK imports nothing of the server; the
test reads the database directly to check what the server recorded."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from autonomy_client import (
    AuthError,
    Client,
    InvalidInput,
    Job,
    JobHandler,
    LanePaused,
    LaneWorker,
    ReleaseTask,
    StaleLease,
    Unavailable,
    ValidationFailed,
)

from app.ops import lane_control, lanes, lifecycle
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests.api_server import ServerThread, serve
from tests.conftest import make_settings
from tests.servers import free_port

TOKEN = "s3cret"


@pytest.fixture
def make_ctx(sqlite_url: str, redis_server_url: str, redis_prefix: str
             ) -> Iterator[Callable[..., Context]]:
    """Contexts on SQLite with the real clock (leases expire for real) and an API token."""
    made: list[Context] = []

    def make(**overrides: Any) -> Context:
        ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                                  api_token=TOKEN, **overrides))
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


@pytest.fixture
def ctx(make_ctx: Callable[..., Context]) -> Context:
    return make_ctx(lease_ttl_s=30.0)


@pytest.fixture
def server(ctx: Context) -> Iterator[ServerThread]:
    with serve(ctx) as s:
        yield s


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.url, TOKEN, wait_ms=1000) as c:
        yield c


def _task(ctx: Context, task_id: int) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=task_id)
    assert row is not None
    return dict(row)


def _until(cond: Callable[[], bool], timeout_s: float = 15.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class _Thread(threading.Thread):
    """Runs ``fn`` and keeps its answer or its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.answer, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.answer = self.fn()
        except BaseException as e:
            self.error = e

    def result(self, timeout_s: float = 30.0) -> Any:
        self.join(timeout_s)
        assert not self.is_alive(), "the thread did not finish"
        if self.error is not None:
            raise self.error
        return self.answer


def _started(fn: Callable[[], Any]) -> _Thread:
    t = _Thread(fn)
    t.start()
    return t


# --- the client -----------------------------------------------------------------------


def test_client_creates_claims_heartbeats_and_completes_a_task(client: Client, ctx: Context
                                                               ) -> None:
    created = client.create("coder", "Fix the retry", payload={"pr": 7}, priority=5)
    tid = created["task"]["id"]
    claimed = client.claim("coder", "w1")
    assert claimed["task"]["id"] == tid and claimed["task"]["payload"] == {"pr": 7}
    token = claimed["lease"]["token"]
    beat = client.heartbeat(tid, token)
    assert beat["lease"]["expiresAt"] >= claimed["lease"]["expiresAt"]
    done = client.complete(tid, token, outcome="success", result={"merged": True})
    assert done["ok"] is True
    row = _task(ctx, tid)
    assert row["status"] == "done" and row["result"] == {"merged": True}
    assert row["claimed_by"] == "w1"


def test_complete_with_claim_next_hands_over_the_next_lease(client: Client) -> None:
    first = client.create("coder", "one")["task"]["id"]
    second = client.create("coder", "two")["task"]["id"]
    lease = client.claim("coder", "w1")
    assert lease["task"]["id"] == first
    answer = client.complete(first, lease["lease"]["token"], outcome="success",
                             claim_next=("coder", "w1"))
    assert answer["next"]["task"]["id"] == second
    released = client.release(second, answer["next"]["lease"]["token"])
    assert released["ok"] is True


@pytest.mark.slow
def test_a_long_poll_claim_outlasts_the_request_timeout_and_returns_when_work_arrives(
        server: ServerThread) -> None:
    """``waitMs`` lengthens the request's timeout by the wait; a task created while the
    claim waits is answered at once, long before the wait or the 5 s safety poll. (A
    loaded machine can take over 0.5 s to answer a plain request: the timeout here is
    2 s, the wait 5 s, and the create goes through a client with the default timeout.)"""
    with Client(server.url, TOKEN, timeout_s=2.0) as c, Client(server.url, TOKEN) as other:
        started = time.monotonic()
        assert c.claim("coder", "w1", wait_ms=5000)["task"] is None
        assert time.monotonic() - started >= 4.9  # the server held it past timeout_s
        waiting = _started(lambda: c.claim("coder", "w1", wait_ms=20_000))
        asked = time.monotonic()
        tid = other.create("coder", "pushed")["task"]["id"]
        answer = waiting.result()
        took = time.monotonic() - asked
    assert answer["task"]["id"] == tid
    assert took < 4.0, f"the waiting claim took {took:.1f}s"


def test_refusals_raise_the_class_of_their_code(client: Client, server: ServerThread,
                                                ctx: Context) -> None:
    tid = client.create("coder", "t")["task"]["id"]
    lane_control.pause_lane(ctx, assignee="coder", reason="hold", actor="test")
    with pytest.raises(LanePaused) as paused:
        client.claim("coder", "w1")
    assert paused.value.code == "lane_paused" and paused.value.details["reason"] == "hold"
    lane_control.resume_lane(ctx, assignee="coder", actor="test")
    client.claim("coder", "w1")
    with pytest.raises(StaleLease):
        client.complete(tid, "f" * 32, outcome="success")
    with pytest.raises(InvalidInput) as bad:
        client.claim("no spaces allowed", "w1")
    assert bad.value.code.startswith("invalid_")
    with pytest.raises(InvalidInput):  # never sent: a set is not JSON
        client.complete(tid, "f" * 32, outcome="success", result={"s": {1}})
    with Client(server.url, "wrong") as intruder, pytest.raises(AuthError):
        intruder.create("coder", "t")
    with Client(f"http://127.0.0.1:{free_port()}", TOKEN, timeout_s=2) as nobody, \
            pytest.raises(Unavailable):
        nobody.claim("coder", "w1")


# --- LaneWorker -----------------------------------------------------------------------


@pytest.mark.slow
def test_lane_worker_picks_up_pushed_work_reports_outcomes_and_stops_cleanly(
        client: Client, ctx: Context) -> None:
    def handler(task: dict[str, Any]) -> dict[str, Any]:
        if task["payload"].get("bad") and task["attempts"] == 0:  # its first run fails
            raise ValidationFailed("lint failed: 3 errors")
        return {"seen": task["title"]}

    lines: list[str] = []
    worker = LaneWorker("coder", handler, client=client, worker_name="w1",
                        idle_backoff_s=(0.01, 0.05), say=lines.append)
    stop = threading.Event()
    running = _started(lambda: worker.run(stop))
    _until(lambda: worker._lane_empty, what="the worker to find the lane empty")
    ok = [client.create("coder", f"t{i}")["task"]["id"] for i in range(3)]
    bad = client.create("coder", "b", payload={"bad": True})["task"]["id"]
    _until(lambda: worker.stats.finished == 5, what="five outcomes")
    stop.set()
    stats = running.result(timeout_s=5)  # a claim in flight returns within its waitMs (1 s)
    assert stats.succeeded == 4 and stats.failed == 1 and stats.lost == stats.kept == 0
    for tid in [*ok, bad]:
        row = _task(ctx, tid)
        assert row["status"] == "done" and row["result"] == {"seen": row["title"]}
    retried = _task(ctx, bad)
    assert retried["attempts"] == 1
    # attempts counts failures so far, and the log line says so (not "attempt 1")
    claimed = [ln.split(": ")[-1] for ln in lines if f"task {bad}: claimed" in ln]
    assert claimed == ["claimed (0 failures so far)", "claimed (1 failure so far)"]
    assert retried["failure_fingerprint"] == "coder:lint failed: <n> errors"
    assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat-w1")]


class _SlowHandler(JobHandler):
    """Works until its lease has been extended ``beats`` times."""

    def __init__(self, beats: int) -> None:
        self.beats = beats

    def handle_job(self, job: Job) -> dict[str, Any]:
        _until(lambda: job.heartbeats >= self.beats, what="heartbeats")
        return {"heartbeats": job.heartbeats}


@pytest.mark.slow
def test_heartbeats_keep_the_lease_of_a_handler_slower_than_the_lease(
        make_ctx: Callable[..., Context]) -> None:
    ctx = make_ctx(lease_ttl_s=1.0)
    tid = lanes.create(ctx, assignee="coder", title="slow")["task"]["id"]
    with serve(ctx) as server, Client(server.url, TOKEN) as client:
        worker = LaneWorker("coder", _SlowHandler(4), client=client, worker_name="w1")
        stats = worker.run(threading.Event(), max_tasks=1)
    assert stats.succeeded == 1 and stats.lost == 0
    row = _task(ctx, tid)
    assert row["status"] == "done" and row["result"]["heartbeats"] >= 4  # > 1 s of work


class _Gate(JobHandler):
    """Signals when it starts, then finishes when the test says so; counts its runs."""

    def __init__(self) -> None:
        self.started, self.go, self.runs = threading.Event(), threading.Event(), 0

    def handle_job(self, job: Job) -> dict[str, Any]:
        self.runs += 1
        self.started.set()
        assert self.go.wait(30)
        return {"runs": self.runs}


class _UntilLeaseLost(JobHandler):
    """Works until its lease is lost (or 30 s), then says whether it saw a cancel."""

    def __init__(self) -> None:
        self.started, self.saw_cancel = threading.Event(), None

    def handle_job(self, job: Job) -> dict[str, Any]:
        self.started.set()
        assert job.lease_lost.wait(30), "the lease was never lost"
        self.saw_cancel = job.cancelled.is_set()
        return {"finished": "anyway"}


def test_a_cancelled_task_stops_its_work_and_its_outcome_is_not_sent(
        make_ctx: Callable[..., Context]) -> None:
    """A cancel while the handler runs: the next heartbeat answers ``task_cancelled``; the
    handler sees ``job.cancelled`` with ``lease_lost``; the worker sends no complete (the
    task stays cancelled) and counts it cancelled, not lost."""
    ctx = make_ctx(lease_ttl_s=1.5)
    tid = lanes.create(ctx, assignee="coder", title="cancel me")["task"]["id"]
    handler = _UntilLeaseLost()
    sent: list[str] = []  # the action of every request

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(str(json.loads(request.content).get("action")))
            return super().handle_request(request)

    with serve(ctx) as server, Client(server.url, TOKEN, transport=Recording()) as client:
        worker = LaneWorker("coder", handler, client=client, worker_name="w1")
        stop = threading.Event()
        run = _started(lambda: worker.run(stop))
        assert handler.started.wait(30)
        lifecycle.cancel(ctx, task_id=tid, actor="alice")
        _until(lambda: handler.saw_cancel is not None, 30, "the handler to see its lease lost")
        _until(lambda: worker.stats.cancelled == 1, 30, "the worker to count the cancel")
        stop.set()
        stats = run.result()
    assert handler.saw_cancel is True
    assert stats.cancelled == 1 and stats.lost == 0 and stats.finished == 0
    assert "heartbeat" in sent and "complete" not in sent and "complete_many" not in sent, sent
    assert _task(ctx, tid)["status"] == "cancelled"


class _CountingTransport(httpx.HTTPTransport):
    """Counts the completes that could not reach the server."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_completes = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.TransportError:
            if b'"complete"' in request.content:
                self.failed_completes += 1
            raise


@pytest.mark.slow
def test_an_outcome_is_retried_through_an_outage_and_lands_when_the_api_is_back(
        ctx: Context) -> None:
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    server = ServerThread(_app(ctx)).start()
    transport = _CountingTransport()
    gate = _Gate()
    with Client(server.url, TOKEN, transport=transport) as client:
        worker = LaneWorker("coder", gate, client=client, worker_name="w1")
        running = _started(lambda: worker.run(threading.Event(), max_tasks=1))
        try:
            assert gate.started.wait(15)
            server.stop()  # the API goes away while the task runs
            gate.go.set()
            _until(lambda: transport.failed_completes >= 2, what="the complete to be retried")
            server = ServerThread(_app(ctx), port=server.port).start()
            stats = running.result()
        finally:
            server.stop()
    assert stats.succeeded == 1 and stats.kept == 0 and gate.runs == 1
    assert _task(ctx, tid)["status"] == "done"


def test_an_outcome_kept_past_its_lease_is_reported_when_the_task_returns_not_run_again(
        make_ctx: Callable[..., Context]) -> None:
    ctx = make_ctx(lease_ttl_s=1.0)
    tid = lanes.create(ctx, assignee="coder", title="t")["task"]["id"]
    server = ServerThread(_app(ctx)).start()
    gate = _Gate()
    with Client(server.url, TOKEN, wait_ms=500) as client:
        worker = LaneWorker("coder", gate, client=client, worker_name="w1",
                            pause_backoff_s=(0.05, 0.2))
        running = _started(lambda: worker.run(threading.Event(), max_tasks=1))
        try:
            assert gate.started.wait(15)
            server.stop()
            gate.go.set()
            _until(lambda: worker.stats.kept == 1, what="the outcome to be kept")
            server = ServerThread(_app(ctx), port=server.port).start()
            stats = running.result()
        finally:
            server.stop()
    assert gate.runs == 1  # the task came back to this worker and was not run again
    assert stats.succeeded == 1 and stats.claimed == 2
    row = _task(ctx, tid)
    assert row["status"] == "done" and row["result"] == {"runs": 1}


class _UntilStopped(JobHandler):
    def __init__(self) -> None:
        self.started = threading.Event()

    def handle_job(self, job: Job) -> dict[str, Any]:
        self.started.set()
        assert job.stopping.wait(30)
        raise ReleaseTask("stopping")


def test_a_stop_while_a_handler_runs_releases_its_lease_and_ends_the_run(
        client: Client, ctx: Context) -> None:
    tid = client.create("coder", "t")["task"]["id"]
    client.create("coder", "never claimed")
    handler = _UntilStopped()
    worker = LaneWorker("coder", handler, client=client, worker_name="w1")
    stop = threading.Event()
    running = _started(lambda: worker.run(stop))
    assert handler.started.wait(15)
    stop.set()
    stats = running.result(timeout_s=10)
    assert stats.released == 1 and stats.finished == 0
    row = _task(ctx, tid)
    assert row["status"] == "todo" and row["lease_token"] is None and row["attempts"] == 0


def _app(ctx: Context) -> Any:
    from app.api.app import create_app

    return create_app(ctx=ctx)


# --- a prefetch: K leases at once -------------------------------------------------------


class _Recording(Client):
    """A client that keeps every request's action and every claim's grants."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.actions: list[str] = []
        self.granted: list[int] = []  # leases per claim or hand-over

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.actions.append(request["action"])
        answer = super().call(request)
        grant = answer if request["action"] == "claim" else answer.get("next")
        if isinstance(grant, dict) and grant.get("task") is not None:
            self.granted.append(len(grant.get("leases") or [grant]))
        return answer


def test_a_prefetching_worker_holds_k_leases_and_completes_its_successes_together(
        server: ServerThread, ctx: Context) -> None:
    lane_control.configure_lane(ctx, assignee="coder", max_in_flight=10, actor="t")

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        if task["payload"].get("bad") and task["attempts"] == 0:  # its first run fails
            raise ValidationFailed("flaky check")
        return {"seen": task["title"]}

    with _Recording(server.url, TOKEN, wait_ms=1000) as client:
        ids = [client.create("coder", f"t{i}")["task"]["id"] for i in range(9)]
        bad = client.create("coder", "b", payload={"bad": True})["task"]["id"]
        worker = LaneWorker("coder", handler, client=client, worker_name="w1", prefetch=3,
                            idle_backoff_s=(0.01, 0.05))
        stop = threading.Event()
        running = _started(lambda: worker.run(stop))
        _until(lambda: worker.stats.finished == 11, timeout_s=60, what="eleven outcomes")
        stop.set()
        stats = running.result(timeout_s=30)
    assert stats.succeeded == 10 and stats.failed == 1 and stats.lost == stats.kept == 0
    assert stats.released == 0
    for tid in [*ids, bad]:
        row = _task(ctx, tid)
        assert row["status"] == "done" and row["result"] == {"seen": row["title"]}
    assert _task(ctx, bad)["attempts"] == 1
    # K leases a grant at most, and the first grant took all K; successes went together
    assert client.granted and max(client.granted) == 3 and client.granted[0] == 3
    assert "complete_many" in client.actions
    assert client.actions.count("complete_many") < 10  # not one request a success
    assert client.actions.count("complete") == 1  # the failure, alone (the breaker reads it)


def test_a_stop_gives_back_the_prefetched_leases_not_yet_run(
        server: ServerThread, ctx: Context) -> None:
    lane_control.configure_lane(ctx, assignee="coder", max_in_flight=10, actor="t")
    with Client(server.url, TOKEN, wait_ms=1000) as client:
        ids = [client.create("coder", f"t{i}")["task"]["id"] for i in range(4)]
        handler = _UntilStopped()
        worker = LaneWorker("coder", handler, client=client, worker_name="w1", prefetch=4)
        stop = threading.Event()
        running = _started(lambda: worker.run(stop))
        assert handler.started.wait(60)
        assert sum(_task(ctx, t)["lease_token"] is not None for t in ids) == 4  # K held
        stop.set()
        stats = running.result(timeout_s=30)
    assert stats.claimed == 4 and stats.released == 4 and stats.finished == 0
    for tid in ids:
        row = _task(ctx, tid)
        assert row["status"] == "todo" and row["lease_token"] is None and row["attempts"] == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat-w1")]


def test_a_prefetch_outside_what_the_server_grants_is_refused_before_any_call(
        client: Client) -> None:
    for bad in (0, -1, 101, True, 2.5):
        with pytest.raises(ValueError, match="prefetch must be an integer from 1 to 100"):
            LaneWorker("coder", lambda task: None, client=client, prefetch=bad)  # type: ignore[arg-type]
