"""``autonomy up`` supervises its children (SPEC 4.7, issue 9): a child that exits once
the stack is ready is restarted with backoff and said in one line; only a signal, or a
child that keeps dying right after it starts, stops the stack. The Supervisor runs
in-process here with small stand-in children (the whole stack is tests/test_up.py's)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.local.up import Child, Supervisor
from app.settings import Settings
from tests.servers import free_port

SERVE = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]


def _wait_file_then_exit(path: Path, code: int) -> list[str]:
    return [sys.executable, "-c",
            "import os, sys, time\n"
            f"while not os.path.exists({str(path)!r}): time.sleep(0.05)\n"
            f"sys.exit({code})\n"]


class StandIn(Supervisor):
    """The real Supervisor with a plan of stand-ins: an "api" that listens, and others."""

    def __init__(self, settings: Settings, port: int, others: list[Child]) -> None:
        super().__init__(settings, host="127.0.0.1", port=port, flower_port=free_port(),
                         flower=False, out=io.StringIO())
        self.others = others

    def _plan(self, effective: Settings) -> list[Child]:
        os.makedirs(self.settings.data_dir, exist_ok=True)
        return [Child("api", [*SERVE, str(self.port)]), *self.others]

    def _answers(self, name: str, base: str) -> bool:
        # the stand-in API has no /livez with this start's nonce: listening is ready here
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    @property
    def text(self) -> str:
        assert isinstance(self.out, io.StringIO)
        return self.out.getvalue()


def _settings(tmp_path: Path, redis_server_url: str) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'up.db'}", redis_url=redis_server_url,
                    data_dir=str(tmp_path / "data"), up_restart_backoff_first_s=0.2,
                    up_restart_backoff_max_s=1.0, up_child_min_uptime_s=30.0,
                    up_child_max_quick_deaths=3, up_stop_grace_s=5.0)


def _until(cond: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_child_killed_after_ready_is_restarted_and_said_in_one_line(
        tmp_path: Path, redis_server_url: str) -> None:
    """Before: "beat exited with code ...; stopping everything" and the stack was gone."""
    port = free_port()
    sup = StandIn(_settings(tmp_path, redis_server_url), port,
                  [Child("beat", [sys.executable, "-c", "import time; time.sleep(600)"])])
    seen: dict[str, int] = {}

    def fault() -> None:
        _until(lambda: "autonomy up: ready\n" in sup.text)
        beat = next(c for c in sup.children if c.name == "beat")
        assert beat.proc is not None
        seen["first"] = beat.proc.pid
        os.kill(beat.proc.pid, signal.SIGKILL)
        _until(lambda: beat.restarts == 1 and beat.proc is not None
               and beat.proc.pid != seen["first"] and beat.proc.poll() is None)
        seen["second"] = beat.proc.pid
        with socket.create_connection(("127.0.0.1", port), 5):  # the api stayed up
            pass
        sup.stop_signal = signal.SIGTERM

    t = threading.Thread(target=fault, daemon=True)
    t.start()
    assert sup.run() == 0
    t.join(30)
    lines = [ln for ln in sup.text.splitlines() if "beat exited" in ln]
    assert lines == ["autonomy up: beat exited (signal 9); restarting it in 0.2s "
                     "(restart 1)"], sup.text
    assert "stopping everything" not in sup.text
    assert "second" in seen
    for pid in seen.values():
        _until(lambda pid=pid: not _alive(pid))


@pytest.mark.slow
def test_a_child_that_keeps_dying_at_startup_stops_the_stack(
        tmp_path: Path, redis_server_url: str) -> None:
    """Each start of "crasher" exits at once, once the stack is ready (a marker file)."""
    marker = tmp_path / "ready"
    sup = StandIn(_settings(tmp_path, redis_server_url), free_port(),
                  [Child("crasher", _wait_file_then_exit(marker, 3))])

    def mark() -> None:
        _until(lambda: "autonomy up: ready\n" in sup.text)
        marker.touch()

    t = threading.Thread(target=mark, daemon=True)
    t.start()
    assert sup.run() == 1
    t.join(30)
    text = sup.text
    assert text.count("crasher exited (code 3); restarting it in") == 2, text
    assert ("error: crasher keeps dying at startup (code 3, 3 times in a row within "
            "30s of starting); stopping everything") in text, text


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_an_embedded_redis_that_keeps_dying_at_startup_stops_the_stack_in_one_line(
        tmp_path: Path) -> None:
    """The embedded Redis counts its quick deaths as a child does: here one death within
    ``up_child_min_uptime_s`` of its start is one too many, so ``up`` says so, with the
    real signal, and stops everything (exit 1) instead of restarting it for ever."""
    s = Settings(database_url=f"sqlite:///{tmp_path / 'up.db'}", redis_url=None,
                 local_redis_probe_url=f"redis://127.0.0.1:{free_port()}/0",
                 data_dir=str(tmp_path / "data"), up_child_min_uptime_s=600.0,
                 up_child_max_quick_deaths=1, up_stop_grace_s=5.0)
    sup = StandIn(s, free_port(), [])
    seen: dict[str, int] = {}

    def fault() -> None:
        _until(lambda: "autonomy up: ready\n" in sup.text)
        assert sup.redis_child is not None and sup.redis_child.proc is not None
        seen["redis"] = sup.redis_child.proc.pid
        os.kill(seen["redis"], signal.SIGKILL)

    t = threading.Thread(target=fault, daemon=True)
    t.start()
    assert sup.run() == 1
    t.join(30)
    lines = [ln for ln in sup.text.splitlines() if "redis exited" in ln]
    assert lines == ["autonomy up: error: redis exited (signal 9) and keeps dying at startup "
                     "(1 times in a row within 600s of starting); stopping everything"], sup.text
    _until(lambda: not _alive(seen["redis"]))
