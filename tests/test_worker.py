"""LaneWorker, the command runner and the clients, in-process against real Redis + SQLite
(with the real clock: heartbeats and leases run in real time here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import ops
from app.errors import AutonomyError, LanePaused, StaleLease, TaskNotFound
from app.local import demo
from app.ops import lane_control, lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from app.workers.client import HttpClient, LocalClient, error_from_wire
from app.workers.command import CommandRunner
from app.workers.lane_worker import Job, LaneWorker, ValidationFailed, default_worker_name
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def rctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """A Context on SQLite with the real clock and a 1 s lease."""
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            lease_ttl_s=1.0))
    yield c
    c.close()


def _task(ctx: Context, task_id: int) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=task_id)
    assert row is not None
    return dict(row)


def _events(ctx: Context, kind: str, task_id: int | None = None) -> list[dict[str, Any]]:
    with transaction(ctx.engine, write=False) as conn:
        return [dict(r) for r in store.list_events(conn, kind=kind, task_id=task_id)]


def _worker(ctx: Context, handler: Any, lines: list[str], **kw: Any) -> LaneWorker:
    return LaneWorker("coder", handler, worker_name="w1", client=LocalClient(ctx),
                      say=lines.append, idle_backoff_s=(0.01, 0.05), **kw)


def _in_thread(fn: Callable[[], Any]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- LaneWorker --------------------------------------------------------------------


def test_handler_result_completes_the_task_with_it(rctx: Context) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t", payload={"x": 2})["task"]["id"]
    seen: list[dict[str, Any]] = []
    lines: list[str] = []

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        seen.append(task)
        return {"doubled": task["payload"]["x"] * 2}

    stats = _worker(rctx, handler, lines).run(max_tasks=1)
    assert stats.as_dict() == {"claimed": 1, "succeeded": 1, "failed": 0, "released": 0,
                               "lost": 0, "cancelled": 0}
    assert seen[0]["id"] == tid and seen[0]["status"] == "in_progress"
    row = _task(rctx, tid)
    assert row["status"] == "done" and row["result"] == {"doubled": 4}
    assert [e["actor"] for e in _events(rctx, "task_completed", tid)] == ["w1"]


@pytest.mark.slow
def test_validation_failed_fails_the_task_and_feeds_the_breaker(rctx: Context) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    lines: list[str] = []

    def handler(task: dict[str, Any]) -> None:
        raise ValidationFailed("Missing tests in module 42", result={"lint": "ok"})

    stats = _worker(rctx, handler, lines).run(max_tasks=3)
    assert (stats.failed, stats.succeeded) == (3, 0)
    row = _task(rctx, tid)
    assert row["status"] == "todo" and row["attempts"] == 3
    assert row["failure_fingerprint"] == "coder:missing tests in module <n>"
    assert row["result"] == {"lint": "ok"}
    with transaction(rctx.engine, write=False) as conn:
        assert store.get_lane(conn, assignee="coder")["paused"]  # type: ignore[index]
    assert "the lane is paused by the breaker" in lines[-1]


def test_any_exception_fails_the_task_with_its_message(rctx: Context) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]

    def handler(task: dict[str, Any]) -> None:
        raise RuntimeError("upstream said no")

    stats = _worker(rctx, handler, []).run(max_tasks=1)
    assert stats.failed == 1
    assert _task(rctx, tid)["last_validation_reason"] == "upstream said no"


def test_unserialisable_result_fails_the_task_instead_of_stranding_it(rctx: Context) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    stats = _worker(rctx, lambda task: {"x": object()}, []).run(max_tasks=1)
    assert stats.failed == 1
    row = _task(rctx, tid)
    assert row["status"] == "todo"
    assert row["last_validation_reason"].startswith("invalid result:")


@pytest.mark.slow
def test_heartbeat_keeps_the_lease_of_a_handler_slower_than_the_lease(rctx: Context) -> None:
    """Lease TTL 1 s, handler 2.2 s: only the heartbeat keeps the task from expiring."""
    tid = lanes.create(rctx, assignee="coder", title="slow")["task"]["id"]
    seen: dict[str, Any] = {}

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        first = _task(rctx, tid)["lease_expires_at"]
        time.sleep(2.2)
        seen["later"] = _task(rctx, tid)["lease_expires_at"]
        seen["first"] = first
        with transaction(rctx.engine) as conn:  # what self-heal would do right now
            seen["requeued"] = store.requeue_expired(conn, now=rctx.clock())
        return {"ok": 1}

    w = _worker(rctx, handler, [])
    stats = w.run(max_tasks=1)
    assert seen["later"] > seen["first"]
    assert (seen["later"] - seen["first"]).total_seconds() > 1.0
    assert list(seen["requeued"]) == []
    assert stats.succeeded == 1 and stats.lost == 0
    assert _task(rctx, tid)["status"] == "done"


@pytest.mark.slow
def test_a_heartbeat_stuck_on_the_network_does_not_starve_the_next_lease(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    """The first task's heartbeat hangs (a cut-off host) past the task's end: the worker
    goes on, and the next task is heartbeated by a new thread, not queued behind it."""
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              lease_ttl_s=30.0))
    hung, release = threading.Event(), threading.Event()
    beats: dict[int, int] = {}

    class StuckOnce(LocalClient):
        def heartbeat(self, task_id: int, lease_token: str, **kw: Any) -> dict[str, Any]:
            if not hung.is_set():
                hung.set()
                release.wait(60)  # on the network until the test ends
            beats[task_id] = beats.get(task_id, 0) + 1
            return super().heartbeat(task_id, lease_token, **kw)

    try:
        first = lanes.create(ctx, assignee="coder", title="first", priority=1)["task"]["id"]
        second = lanes.create(ctx, assignee="coder", title="second")["task"]["id"]

        def handler(task: dict[str, Any]) -> dict[str, Any]:
            if task["id"] == first:
                assert hung.wait(10)
                return {"ok": 1}
            _until(lambda: beats.get(second, 0) >= 2)
            return {"ok": 2}

        w = LaneWorker("coder", handler, worker_name="w1", client=StuckOnce(ctx),
                       say=[].append, heartbeat_interval_s=0.05)
        stats = w.run(max_tasks=2)
        assert stats.succeeded == 2 and stats.lost == 0
        assert beats.get(second, 0) >= 2 and beats.get(first, 0) == 0
        assert _task(ctx, second)["status"] == "done"
    finally:
        release.set()
        ctx.close()


@pytest.mark.slow
def test_the_heartbeat_thread_runs_while_the_worker_waits_and_ends_with_it(rctx: Context
                                                                          ) -> None:
    """Started with ``run``, not on the first task's way to its handler (push pickup's
    latency), and gone when ``run`` returns (no thread left behind per worker)."""
    name = f"w-{uuid.uuid4().hex[:8]}"  # no other test's thread has its name

    def beaters() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == f"heartbeat-{name}"]

    w = LaneWorker("coder", lambda task: {"ok": 1}, worker_name=name,
                   client=LocalClient(rctx), say=[].append, idle_backoff_s=(0.01, 0.05))
    stop = threading.Event()
    t = _in_thread(lambda: w.run(stop_event=stop))
    _until(lambda: w._lane_empty)  # waiting on the empty lane, no task yet
    [beater] = beaters()
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    _until(lambda: w.stats.succeeded == 1)
    assert beaters() == [beater]  # the task used the thread that was waiting
    stop.set()
    t.join(10)
    assert not t.is_alive()
    beater.join(10)
    assert not beater.is_alive() and beaters() == []
    assert _task(rctx, tid)["status"] == "done"


def test_work_called_outside_run_leaves_no_heartbeat_thread(rctx: Context) -> None:
    name = f"w-{uuid.uuid4().hex[:8]}"
    seen: list[list[str]] = []

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        seen.append([t.name for t in threading.enumerate()])
        return {"ok": 1}

    w = LaneWorker("coder", handler, worker_name=name, client=LocalClient(rctx),
                   say=[].append)
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    job = w.claim_one(threading.Event())
    assert job is not None
    w.work(job)
    assert f"heartbeat-{name}" in seen[0]  # the task ran under heartbeats
    _until(lambda: not any(t.name == f"heartbeat-{name}" for t in threading.enumerate()))
    assert _task(rctx, tid)["status"] == "done"


@pytest.mark.slow
def test_a_paused_lane_is_said_once_waited_out_and_resumed(rctx: Context) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    lane_control.pause_lane(rctx, assignee="coder", reason="maintenance", actor="test")
    lines: list[str] = []
    w = _worker(rctx, lambda task: {"ok": 1}, lines, pause_backoff_s=(0.02, 0.05))
    stop = threading.Event()
    t = _in_thread(lambda: w.run(stop_event=stop))
    _until(lambda: any("lane_paused" in ln for ln in lines))  # the first refused claim
    time.sleep(0.5)  # ~10 more refusals at (0.02, 0.05) s apart, fewer on a busy machine
    assert _task(rctx, tid)["status"] == "todo"
    paused_lines = [ln for ln in lines if "lane_paused" in ln]
    assert len(paused_lines) == 1 and "maintenance" in paused_lines[0]
    lane_control.resume_lane(rctx, assignee="coder", actor="test")
    _until(lambda: _task(rctx, tid)["status"] == "done")
    stop.set()
    t.join(5)
    assert not t.is_alive()
    assert any("claiming again" in ln for ln in lines)


@pytest.mark.slow
def test_an_empty_lane_is_polled_until_the_stop(rctx: Context) -> None:
    w = _worker(rctx, lambda task: None, [])
    stop = threading.Event()
    t = _in_thread(lambda: w.run(stop_event=stop))
    time.sleep(0.3)  # a few empty polls
    stop.set()
    t.join(30)  # returns once the worker stops; the bound only catches a hang
    assert not t.is_alive() and w.stats.claimed == 0


def test_an_interrupted_handler_releases_its_lease(rctx: Context) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]

    def handler(task: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _worker(rctx, handler, []).run(max_tasks=1, handle_signals=False)
    row = _task(rctx, tid)
    assert row["status"] == "todo" and row["attempts"] == 0 and row["lease_token"] is None
    assert len(_events(rctx, "lease_released", tid)) == 1


def test_heartbeats_follow_a_shorter_lease_than_our_settings_say(rctx: Context) -> None:
    """A server with a shorter lease TTL than the worker's settings: beat at a third of
    what the lease answer says is left."""
    w = _worker(rctx, lambda t: None, [])
    w.heartbeat_interval_s = 100.0  # as if our own settings said 300 s
    expires = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    job = Job(task={"id": 1}, lease_token="0" * 32, lease_expires_at=expires, lane="coder",
              worker="w1", stopping=threading.Event())
    assert 9.0 < w._beat_interval(job) <= 10.0


def test_default_worker_name_is_host_and_pid_and_valid(rctx: Context) -> None:
    name = default_worker_name()
    assert name.endswith(f"-{os.getpid()}")
    assert LaneWorker("coder", lambda t: None, client=LocalClient(rctx)).name == name


# --- the command runner ----------------------------------------------------------------


def _run_cmd(ctx: Context, cmd: list[str], payload: dict[str, Any] | None = None,
             **kw: Any) -> tuple[int, dict[str, Any]]:
    tid = lanes.create(ctx, assignee="coder", title="a title", payload=payload)["task"]["id"]
    _worker(ctx, CommandRunner(cmd, **kw), []).run(max_tasks=1)
    return tid, _task(ctx, tid)


def test_command_gets_the_task_on_stdin_and_in_env_and_json_stdout_is_the_result(
        rctx: Context) -> None:
    script = ("import json, os, sys; t = json.load(sys.stdin); print(json.dumps({"
              "'stdinId': t['id'], 'stdinPayload': t['payload'], "
              "'env': {k: v for k, v in os.environ.items() if k.startswith('AUTONOMY_')}}))")
    tid, row = _run_cmd(rctx, [sys.executable, "-c", script], payload={"k": "v"})
    assert row["status"] == "done"
    res = row["result"]
    assert res["stdinId"] == tid and res["stdinPayload"] == {"k": "v"}
    env = res["env"]
    assert env["AUTONOMY_TASK_ID"] == str(tid) and env["AUTONOMY_TASK_TITLE"] == "a title"
    assert json.loads(env["AUTONOMY_TASK_PAYLOAD"]) == {"k": "v"}
    assert env["AUTONOMY_TASK_ATTEMPTS"] == "0" and env["AUTONOMY_LANE"] == "coder"
    assert env["AUTONOMY_WORKER"] == "w1"


def test_command_plain_stdout_is_kept_as_stdout(rctx: Context) -> None:
    _, row = _run_cmd(rctx, ["sh", "-c", "echo hello; echo world"])
    assert row["status"] == "done" and row["result"] == {"stdout": "hello\nworld\n"}


def test_command_exit_nonzero_fails_with_the_last_stderr_line(rctx: Context) -> None:
    _, row = _run_cmd(rctx, ["sh", "-c", "echo one >&2; echo 'schema invalid' >&2; echo >&2;"
                                         " exit 4"])
    assert row["status"] == "todo" and row["last_validation_reason"] == "schema invalid"
    assert row["result"]["exitCode"] == 4


def test_command_exit_nonzero_without_stderr_fails_with_its_exit_code(rctx: Context) -> None:
    _, row = _run_cmd(rctx, ["sh", "-c", "exit 3"])
    assert row["last_validation_reason"] == "exit code 3"


def test_a_missing_command_fails_the_task(rctx: Context) -> None:
    _, row = _run_cmd(rctx, ["/nonexistent/cmd"])
    assert row["last_validation_reason"].startswith("cannot run /nonexistent/cmd")


def test_command_timeout_kills_its_process_group_and_fails_the_task(
        rctx: Context, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    cmd = ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"]
    _, row = _run_cmd(rctx, cmd, timeout_s=0.5, kill_wait_s=0.5)
    assert row["status"] == "todo" and row["last_validation_reason"] == "timeout after 0.5s"
    child = int(pidfile.read_text())
    _until(lambda: not _alive(child), 5)


def test_command_past_the_shutdown_grace_is_killed_and_its_lease_released(
        rctx: Context, tmp_path: Path) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    started = tmp_path / "started"
    w = _worker(rctx, CommandRunner(["sh", "-c", f"touch {started}; exec sleep 30"],
                                    grace_s=0.3, kill_wait_s=0.5), [])
    stop = threading.Event()
    t = _in_thread(lambda: w.run(stop_event=stop))
    _until(started.exists)
    stop.set()
    t.join(5)
    assert not t.is_alive() and w.stats.released == 1
    row = _task(rctx, tid)
    assert row["status"] == "todo" and row["attempts"] == 0 and row["lease_token"] is None


def test_command_finishing_within_the_grace_completes_its_task(
        rctx: Context, tmp_path: Path) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    started = tmp_path / "started"
    w = _worker(rctx, CommandRunner(["sh", "-c", f"touch {started}; sleep 0.5; echo fin"],
                                    grace_s=5), [])
    stop = threading.Event()
    t = _in_thread(lambda: w.run(stop_event=stop))
    _until(started.exists)
    stop.set()
    t.join(5)
    assert w.stats.succeeded == 1 and _task(rctx, tid)["result"] == {"stdout": "fin\n"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill 0; it is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# --- clients -------------------------------------------------------------------------


def _http_client(ctx: Context) -> HttpClient:
    """An HttpClient whose transport dispatches like the API does (no server needed)."""

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/autonomy"
        assert request.headers["authorization"] == "Bearer s3cret"
        try:
            answer = ops.dispatch(ctx, json.loads(request.content))
        except AutonomyError as e:
            return httpx.Response(e.http_status, json=e.to_wire())
        return httpx.Response(200, json=answer)

    return HttpClient("http://autonomy.test/", "s3cret", settings=ctx.settings,
                      transport=httpx.MockTransport(handle))


def test_http_client_maps_error_answers_back_to_their_classes(rctx: Context) -> None:
    client = _http_client(rctx)
    lanes.create(rctx, assignee="coder", title="t")
    lane_control.pause_lane(rctx, assignee="coder", reason="hold", actor="test")
    with pytest.raises(LanePaused) as paused:
        client.claim("coder", "w1")
    assert paused.value.details["reason"] == "hold"
    with pytest.raises(TaskNotFound):
        client.heartbeat(999, "0" * 32)
    lane_control.resume_lane(rctx, assignee="coder", actor="test")
    answer = client.claim("coder", "w1")
    with pytest.raises(StaleLease):
        client.complete(answer["task"]["id"], "f" * 32, outcome="success")
    client.close()


def test_a_lane_worker_over_http_completes_tasks(rctx: Context) -> None:
    tid = lanes.create(rctx, assignee="coder", title="t")["task"]["id"]
    w = LaneWorker("coder", lambda t: {"via": "http"}, worker_name="h1",
                   client=_http_client(rctx), say=lambda s: None)
    assert w.run(max_tasks=1).succeeded == 1
    assert _task(rctx, tid)["result"] == {"via": "http"}


def test_an_unknown_error_code_keeps_its_code() -> None:
    err = error_from_wire({"ok": False, "error": "brand_new", "message": "m", "x": 1})
    assert type(err) is AutonomyError and err.details == {"error": "brand_new", "x": 1}


def test_http_client_says_unavailable_when_nothing_listens() -> None:
    from app.errors import Unavailable
    from tests.servers import free_port

    client = HttpClient(f"http://127.0.0.1:{free_port()}", "t", timeout_s=2)
    with pytest.raises(Unavailable):
        client.claim("coder", "w1")
    client.close()


# --- the CLI and the demo seed ---------------------------------------------------------


@pytest.mark.slow
def test_worker_cli_refuses_a_bad_lane_name_with_exit_code_2(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    env = {**os.environ, "DATABASE_URL": sqlite_url, "REDIS_URL": redis_server_url,
           "AUTONOMY_REDIS_PREFIX": redis_prefix}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--lane", "bad lane!",
                           "--", "true"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "invalid_assignee" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["lots", "0", "101", "2.5", ""])
def test_worker_cli_refuses_a_prefetch_that_is_neither_auto_nor_k_with_exit_code_2(
        sqlite_url: str, redis_server_url: str, redis_prefix: str, bad: str) -> None:
    env = {**os.environ, "DATABASE_URL": sqlite_url, "REDIS_URL": redis_server_url,
           "AUTONOMY_REDIS_PREFIX": redis_prefix}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--lane", "coder",
                           "--prefetch", bad, "--", "true"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "error: invalid_input: prefetch must be 'auto' or an integer from 1 to 100" \
        in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_seed_fills_its_lanes_and_tops_up_on_a_second_run(rctx: Context) -> None:
    first = demo.seed(rctx)
    assert first["created"] == {"coder": len(demo.CODER_TASKS),
                                "reviewer": len(demo.REVIEWER_TASKS), "deployer": 1}
    lane_control.pause_lane(rctx, assignee="reviewer", reason="tripped", actor="test")
    second = demo.seed(rctx)
    assert second["created"] == {"coder": 0, "reviewer": 0, "deployer": 0}
    with transaction(rctx.engine, write=False) as conn:
        assert not store.get_lane(conn, assignee="reviewer")["paused"]  # type: ignore[index]
        deployer = store.get_lane(conn, assignee=demo.DEAD_LANE)
    assert deployer is not None and deployer["max_attempts"] == demo.DEAD_MAX_ATTEMPTS
    cmds = demo.worker_commands(rctx.settings)
    assert len(cmds) == 3 and all(c[:4] == [sys.executable, "-m", "app.cli", "worker"]
                                  for c in cmds)


@pytest.mark.slow
def test_signal_stops_a_lane_worker_run_in_the_main_thread(rctx: Context) -> None:
    """``run()`` without a stop event turns SIGTERM into a clean stop."""
    w = _worker(rctx, lambda t: None, [])
    before = signal.getsignal(signal.SIGTERM)

    def send_once_installed() -> None:
        _until(lambda: signal.getsignal(signal.SIGTERM) is not before)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = _in_thread(send_once_installed)
    stats = w.run()
    sender.join(5)
    assert stats.claimed == 0 and signal.getsignal(signal.SIGTERM) is before
