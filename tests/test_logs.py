"""One log format: ``AUTONOMY_LOG_FORMAT=json`` makes every process write JSON lines that
carry their ids -- ``task_id``, ``lane``, ``worker`` on task lines, ``request_id`` on the
API's -- and the default is a readable line with the same fields."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import logs
from app.settings import Settings
from tests.api_server import client as api_client
from tests.servers import free_port
from tests.test_api import TOKEN, api_ctx
from tests.test_celery_e2e import REPO, e2e
from tests.test_cli import cli, cli_env, ok
from tests.test_up import Proc, assert_all_gone, base_env, procs, run_cli

__all__ = ["api_ctx", "cli_env", "e2e", "procs"]

FAILING_ON_EVEN_IDS = ("read _; [ $((AUTONOMY_TASK_ID % 2)) = 1 ] "
                       "|| { echo 'bad output' >&2; exit 1; }")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line parsed as one JSON object (fails on any other line)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            obj = json.loads(line)
            assert isinstance(obj, dict), line
            assert {"timestamp", "level", "logger", "message", "process", "pid"} <= obj.keys(), obj
            out.append(obj)
    return out


def _until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger configured to JSON on a buffer; restored afterwards."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    buf = io.StringIO()
    logs.configure(Settings(log_format="json"), process="test", stream=buf)
    yield buf
    sys.excepthook = sys.__excepthook__
    logging.captureWarnings(False)
    logging.getLogger("multiprocessing").handlers.clear()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in before[0]:
        root.addHandler(h)
    root.setLevel(before[1])


@pytest.mark.slow
def test_autonomy_worker_json_lines_carry_task_lane_and_worker(cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    ids = [ok(cli_env, "create", "coder", f"t{i}")["task"]["id"] for i in range(2)]
    env = {**cli_env, "AUTONOMY_LOG_FORMAT": "json"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--lane", "coder",
                           "--name", "w1", "--max-tasks", "2", "--", "sh", "-c",
                           FAILING_ON_EVEN_IDS],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stderr)
    assert all(ln["process"] == "lane-worker" for ln in lines)
    assert all(ln["worker"] == "w1" and ln["lane"] == "coder" for ln in lines)
    task_lines = [ln for ln in lines if "task_id" in ln]
    assert {ln["task_id"] for ln in task_lines} == set(ids)
    assert all(ln["message"].startswith(f"task {ln['task_id']}:") for ln in task_lines)
    msgs = {(ln["task_id"], ln["message"].split(": ", 1)[1].split(" ")[0]) for ln in task_lines}
    done, failed = (ids[0], ids[1]) if ids[0] % 2 else (ids[1], ids[0])
    assert (done, "done") in msgs and (failed, "failed") in msgs
    assert (done, "claimed") in msgs and (failed, "claimed") in msgs
    assert json.loads(proc.stdout)["succeeded"] == 1  # the summary on stdout, unchanged


@pytest.mark.slow
def test_autonomy_worker_text_lines_are_readable_with_the_same_fields(
        cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    task_id = ok(cli_env, "create", "coder", "t")["task"]["id"]
    proc = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--lane", "coder",
                           "--name", "w1", "--max-tasks", "1", "--", "true"],
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    done = [ln for ln in proc.stderr.splitlines() if f"task {task_id}: done" in ln]
    assert len(done) == 1
    assert " INFO  lane-worker app.workers.lane_worker: " in done[0]
    assert done[0].endswith(f"worker=w1 lane=coder task_id={task_id}")
    with pytest.raises(ValueError):
        json.loads(done[0])


@pytest.mark.slow
def test_api_json_lines_carry_the_request_id(cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    port = free_port()
    env = {**cli_env, "AUTONOMY_LOG_FORMAT": "json"}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{base}/api/autonomy/status", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _until(up, 60, "the API to answer")
        mine = httpx.get(f"{base}/metrics", headers={"X-Request-ID": "req-42.a"}, timeout=10)
        theirs = httpx.post(f"{base}/api/autonomy", json={"action": "claim", "assignee": "x"},
                            headers={"X-Request-ID": "has spaces, refused"}, timeout=10)
        fresh = httpx.get(f"{base}/api/autonomy/status", timeout=10)
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
    assert mine.headers["x-request-id"] == "req-42.a"
    assert theirs.status_code == 400 and len(theirs.headers["x-request-id"]) == 32
    assert fresh.headers["x-request-id"] != theirs.headers["x-request-id"]
    lines = json_lines(err)
    assert all(ln["process"] == "api" for ln in lines)
    access = {ln["request_id"]: ln for ln in lines if ln["logger"] == "app.api.access"}
    assert access["req-42.a"]["path"] == "/metrics" and access["req-42.a"]["status"] == 200
    assert access[theirs.headers["x-request-id"]]["status"] == 400
    assert access[fresh.headers["x-request-id"]]["method"] == "GET"
    assert any(ln["logger"].startswith("uvicorn") for ln in lines)  # uvicorn's own, same format


def test_bound_fields_and_celery_task_lines(captured: io.StringIO) -> None:
    log = logging.getLogger("app.test")
    with logs.bound(request_id="r1"):
        log.info("inside")
    log.info("outside")
    logs.set_process_fields(worker="celery@host")
    try:
        # Celery's own "Task %(name)s[%(id)s] succeeded" lines name their task in the args
        logging.getLogger("celery.app.trace").info(
            "Task %(name)s[%(id)s] succeeded", {"name": "tasks.checks.status", "id": "abc"})
    finally:
        logs._process["defaults"] = {}
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it broke", extra={"task_id": 7, "lane": "coder"})
    inside, outside, celery_line, broke = json_lines(captured.getvalue())
    assert inside["request_id"] == "r1" and "request_id" not in outside
    assert celery_line["task_id"] == "abc" and celery_line["worker"] == "celery@host"
    assert celery_line["lane"] is None  # a task line always has the three, null if none
    assert broke["task_id"] == 7 and broke["worker"] is None and broke["level"] == "error"
    assert "RuntimeError: boom" in broke["exception"]


def test_log_format_setting_is_checked() -> None:
    assert Settings(log_format="JSON").log_format == "json"  # type: ignore[arg-type]
    assert Settings(log_level="debug").log_level == "DEBUG"  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Settings(log_format="xml")  # type: ignore[arg-type]


def _stop_group(p: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


@pytest.mark.slow
def test_celery_worker_and_beat_write_json_lines_that_name_the_task(
        e2e: dict[str, Any]) -> None:
    env = {**e2e["env"], "AUTONOMY_LOG_FORMAT": "json", "AUTONOMY_JOB_MIN_RUNTIME_MS": "{}"}
    node = f"logs-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    tmp: Path = e2e["tmp"]
    celery = [sys.executable, "-m", "celery", "-A", "app.celery_app"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    errs = {name: (tmp / f"{name}.err") for name in ("worker", "beat")}
    outs = {name: (tmp / f"{name}.out") for name in ("worker", "beat")}
    try:
        for name, args in (("worker", ["worker", "--loglevel", "INFO", "--concurrency", "1",
                                       "-n", node, "--without-mingle", "--without-gossip"]),
                           ("beat", ["beat", "--loglevel", "INFO", "--schedule",
                                     str(tmp / "celerybeat-schedule")])):
            with errs[name].open("wb") as err, outs[name].open("wb") as out:
                procs[name] = subprocess.Popen([*celery, *args], env=env, cwd=REPO,
                                               stdout=out, stderr=err,
                                               start_new_session=True)

        def worker_lines() -> list[dict[str, Any]]:
            text = errs["worker"].read_text(errors="replace")
            return json_lines(text[: text.rfind("\n") + 1])  # whole lines only

        def every_job_succeeded() -> bool:
            done = " ".join(ln["message"] for ln in worker_lines() if "succeeded" in ln["message"])
            return all(f"tasks.checks.{j}[" in done for j in ("status", "self_heal"))

        _until(every_job_succeeded, 90, "the worker to run the status and self-heal jobs")
    finally:
        for p in procs.values():
            _stop_group(p)
    worker = json_lines(errs["worker"].read_text())
    beat = json_lines(errs["beat"].read_text())
    assert {ln["process"] for ln in worker} == {"celery-worker"}
    assert {ln["process"] for ln in beat} == {"celery-beat"}
    # no banner or shutdown notice in text: nothing on stdout, beat's banner is JSON lines
    assert outs["worker"].read_text() == "" and outs["beat"].read_text() == ""
    assert any(ln["logger"] == "stdout" and "celery beat v" in ln["message"] for ln in beat)
    assert any(ln["message"] == "worker: Warm shutdown (MainProcess)" for ln in worker)
    assert any("Sending due task" in ln["message"] for ln in beat)
    task_lines = [ln for ln in worker if ln.get("task_id")]
    received = [ln for ln in task_lines if "received" in ln["message"].lower()]
    succeeded = [ln for ln in task_lines if "succeeded" in ln["message"]]
    assert received and succeeded
    for ln in task_lines:
        assert ln["worker"] == node and ln["lane"] is None, ln
        assert ln["task_id"] in ln["message"] or ln.get("task_name"), ln
    ran = [ln for ln in task_lines if ln.get("task_name")]  # logged inside the task (prerun)
    assert {ln["pid"] for ln in ran} - {procs["worker"].pid}, "no line from a pool child"


def test_an_unexpected_api_error_is_logged_with_its_request_id(
        captured: io.StringIO, api_ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.api import routes

    def boom(*_: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(routes.ops, "dispatch", boom)
    with api_client(api_ctx, TOKEN) as http:  # status needs a credential (SPEC 4.10)
        resp = http.get("/api/autonomy/status", headers={"X-Request-ID": "err-1"})
    assert resp.status_code == 500 and resp.json()["error"] == "internal_error"
    lines = [ln for ln in json_lines(captured.getvalue()) if ln.get("request_id") == "err-1"]
    error = next(ln for ln in lines if ln["level"] == "error")
    assert "RuntimeError: boom" in error["exception"] and error["logger"] == "app.api.app"
    access = next(ln for ln in lines if ln["logger"] == "app.api.access")
    assert access["status"] == 500 and access["path"] == "/api/autonomy/status"


def test_lines_logged_by_a_handler_name_the_task(captured: io.StringIO, api_ctx: Any) -> None:
    """A Python LaneWorker's handler logs through ``logging``: its lines carry the task."""
    from app import ops
    from app.workers.client import LocalClient
    from app.workers.lane_worker import LaneWorker

    task_id = ops.dispatch(api_ctx, {"action": "create", "assignee": "coder",
                                     "title": "t"})["task"]["id"]

    def handler(task: dict[str, Any]) -> dict[str, Any]:
        logging.getLogger("my.handler").info("working on %s", task["title"])
        return {}

    LaneWorker("coder", handler, worker_name="w9", client=LocalClient(api_ctx)).run(
        max_tasks=1, handle_signals=False)
    lines = json_lines(captured.getvalue())
    mine = next(ln for ln in lines if ln["logger"] == "my.handler")
    assert (mine["task_id"], mine["lane"], mine["worker"]) == (task_id, "coder", "w9")
    done = next(ln for ln in lines if ln["message"] == f"task {task_id}: done")
    assert (done["task_id"], done["lane"], done["worker"]) == (task_id, "coder", "w9")


def test_a_line_with_a_lone_surrogate_is_written_escaped_not_dropped() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        for fmt in ("json", "text"):
            logs.configure(Settings(log_format=fmt), process="test", stream=stream)
            logging.getLogger("app.test").warning("bad \udc80 reason", extra={"lane": "x\udcff"})
    finally:
        sys.excepthook = sys.__excepthook__
        logging.captureWarnings(False)
        logging.getLogger("multiprocessing").handlers.clear()
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in before[0]:
            root.addHandler(h)
        root.setLevel(before[1])
    json_line, text_line = raw.getvalue().decode("utf-8").splitlines()
    parsed = json.loads(json_line)
    assert parsed["message"] == "bad \udc80 reason" and parsed["lane"] == "x\udcff"
    assert "bad \\udc80 reason" in text_line and "lane=x\\udcff" in text_line


ROLES = {"up", "api", "celery-worker", "celery-beat", "flower", "lane-worker"}


def _every_line(text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(log lines, other objects): every non-empty line must be one JSON object; the only
    objects that are not log lines are ``autonomy worker``'s summaries (its stdout)."""
    logged, other = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        if "timestamp" in obj:
            logged.extend(json_lines(line))
        else:
            assert {"claimed", "succeeded"} <= obj.keys(), line
            other.append(obj)
    return logged, other


@pytest.mark.slow
def test_every_line_of_every_process_up_runs_is_one_json_object(
        tmp_path: Path, procs: list[Proc], redis_server_url: str, redis_prefix: str) -> None:
    """With ``AUTONOMY_LOG_FORMAT=json``, ``autonomy up --demo`` passes its children's lines
    through untouched and writes its own as JSON: every line it prints, and every line of
    the start-up output it keeps in a file, parses; each role is named apart."""
    port, flower_port = free_port(), free_port()
    env = base_env(tmp_path, REDIS_URL=redis_server_url, AUTONOMY_REDIS_PREFIX=redis_prefix,
                   AUTONOMY_CELERY_QUEUE=f"q-{redis_prefix}", AUTONOMY_BEAT_EVERY_S="1",
                   AUTONOMY_LOG_FORMAT="json")
    p = run_cli(procs, env, tmp_path, "up", "--demo", "--port", str(port),
                "--flower-port", str(flower_port))
    p.wait_for('"message": "ready"')
    start_log = tmp_path / "data" / "up-start.log"

    def roles() -> set[str]:
        # whole lines only: the file's last line may be half-written while up runs (it
        # was once read half, and glued to the first line of the output: JSONDecodeError)
        kept = start_log.read_text()
        kept = kept[:kept.rfind("\n") + 1]
        text = kept + "\n".join(p.lines[:-1])
        return {ln["process"] for ln in _every_line(text)[0]}

    # beat sends every second, the worker runs what it sends, the demo workers claim
    _until(lambda: roles() >= ROLES, 90, f"a line from each of {sorted(ROLES)}")
    children = [c.pid for c in p.descendants()]
    assert p.stop(signal.SIGINT) == 0
    assert_all_gone(children)
    logged, summaries = _every_line(start_log.read_text() + "\n" + p.output)
    assert {ln["process"] for ln in logged} == ROLES
    up_lines = [ln for ln in logged if ln["process"] == "up"]
    assert {ln["logger"] for ln in up_lines} == {"app.local.up"}
    assert any(ln["message"] == "stopped" for ln in up_lines)
    assert any(ln["logger"] == "flower.command" for ln in logged)
    assert len(summaries) <= 3  # the three demo workers' results, when they print them
    counts = Counter(ln["process"] for ln in logged)
    print(f"\n[json lines per process] {dict(sorted(counts.items()))}; "
          f"lines that were not JSON: 0 (each one parsed)")


def test_up_passes_raw_lines_through_or_prefixes_them_with_the_childs_name() -> None:
    from app.local.up import Supervisor

    for raw, fmt, want in ((True, "text", '{"a": 1}\n'), (False, "text", "api | {"),
                           (None, "json", '{"a": 1}\n'), (None, "text", "api | {")):
        out = io.StringIO()
        sup = Supervisor(Settings(log_format=fmt), host="127.0.0.1", port=1, flower_port=2,
                         out=out, raw_logs=raw)
        sup._ready = True
        sup._pump("api", io.StringIO('{"a": 1}'))
        assert out.getvalue() == want if want.endswith("\n") else want in out.getvalue()
        sup.say("hello")
        sup.say("error: it broke")
        hello, broke = out.getvalue().splitlines()[-2:]
        if fmt == "json":
            assert (json.loads(hello)["message"], json.loads(hello)["level"]) == ("hello", "info")
            assert json.loads(broke)["level"] == "error"
        else:
            assert (hello, broke) == ("autonomy up: hello", "autonomy up: error: it broke")


@pytest.mark.parametrize(("argv", "role"), [
    (["/venv/bin/celery", "-A", "app.celery_app", "worker", "-E"], "celery-worker"),
    (["/venv/lib/celery/__main__.py", "-A", "app.celery_app", "--quiet", "beat"], "celery-beat"),
    (["/venv/bin/celery", "-A", "app.celery_app", "flower", "--port=5555"], "flower"),
    (["/venv/bin/celery", "-A", "app.celery_app", "inspect", "run_locks"], None),
    (["/venv/bin/pytest", "-k", "worker"], None),
])
def test_each_celery_command_names_its_role(argv: list[str], role: str | None) -> None:
    from app.celery_app import celery_role

    assert celery_role(argv) == role


def test_printed_lines_become_json_lines_of_the_stdout_logger() -> None:
    """What a library prints past ``logging`` -- with ``print`` or straight to file
    descriptor 1, as Celery's shutdown notice does -- leaves as JSON on stderr, even at
    exit."""
    code = ("import logging, os; from app import logs; from app.settings import Settings; "
            "logs.configure(Settings(log_format='json'), process='celery-worker'); "
            "logs.capture_stdout(); print('banner line'); print(); "
            "os.write(1, b'\\nworker: Warm shutdown (MainProcess)\\n')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = json_lines(proc.stderr)
    assert [(ln["logger"], ln["message"]) for ln in lines] == [
        ("stdout", "banner line"), ("stdout", "worker: Warm shutdown (MainProcess)")]
    assert {ln["process"] for ln in lines} == {"celery-worker"}
