"""``CommandRunner``: the handler under ``autonomy worker -- CMD``. Runs CMD once per task.

CMD gets the task as JSON on stdin and in the environment (``AUTONOMY_TASK_ID``,
``AUTONOMY_TASK_TITLE``, ``AUTONOMY_TASK_PAYLOAD`` (JSON), ``AUTONOMY_TASK_ATTEMPTS``,
``AUTONOMY_LANE``, ``AUTONOMY_WORKER``). Exit 0 is success: stdout is the result (the
object itself when stdout is one JSON object, else ``{"stdout": ...}``). Any other exit is
a failure whose validation reason is the last non-empty line of stderr (else
``exit code N``). CMD runs in a process group of its own, so a timeout, a lost lease or an
expired shutdown grace kills everything it started.

CMD never outlives the worker (SPEC 4.7): it gets a parent-death signal (SIGKILL, via
``prctl(PR_SET_PDEATHSIG)``), and a watchdog process -- one per worker process, in a
session of its own, holding a pipe from the worker -- SIGKILLs every command group still
running when that pipe closes, which is when the worker dies, even by SIGKILL (the
command's children included, which a parent-death signal alone would leave behind).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from app.workers.job import Job, JobHandler, ReleaseTask, ValidationFailed

POLL_S = 0.1
STDERR_KEPT_CHARS = 2000


class CommandRunner(JobHandler):
    """Run ``cmd`` per task.

    ``timeout_s``: kill CMD and fail the task with ``timeout after Ns``. ``grace_s``: once
    the worker is stopping, how long a running CMD may take before it is killed and its
    lease released; ``hurry`` (a second signal) cuts the grace short. ``kill_wait_s``: how
    long CMD has between SIGTERM and SIGKILL.
    """

    def __init__(self, cmd: Sequence[str], *, timeout_s: float | None = None,
                 grace_s: float = 30.0, kill_wait_s: float = 2.0,
                 hurry: threading.Event | None = None, result_max_bytes: int = 65536,
                 env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        if not cmd:
            raise ValueError("a command is required")
        self.cmd = list(cmd)
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.kill_wait_s = kill_wait_s
        self.hurry = hurry or threading.Event()
        self.result_max_bytes = result_max_bytes
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd

    def task_env(self, job: Job) -> dict[str, str]:
        """The environment CMD runs with: ours plus the task's ``AUTONOMY_*`` variables."""
        t = job.task
        return {**self.env,
                "AUTONOMY_TASK_ID": str(t["id"]),
                "AUTONOMY_TASK_TITLE": str(t.get("title") or ""),
                "AUTONOMY_TASK_PAYLOAD": json.dumps(t.get("payload") or {}),
                "AUTONOMY_TASK_ATTEMPTS": str(t.get("attempts") or 0),
                "AUTONOMY_LANE": job.lane,
                "AUTONOMY_WORKER": job.worker}

    def handle_job(self, job: Job) -> dict[str, Any] | None:
        """Run CMD for one task; answers its result or raises ``ValidationFailed`` /
        ``ReleaseTask``."""
        try:
            proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.task_env(job),
                                    cwd=self.cwd, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        except OSError as e:  # not found, not executable: the same failure every time
            raise ValidationFailed(f"cannot run {self.cmd[0]}: {e.strerror or e}") from e
        _WATCHDOG.watch(proc.pid)
        try:
            return self._wait(job, proc)
        finally:
            _WATCHDOG.forget(proc.pid)

    def _wait(self, job: Job, proc: subprocess.Popen[bytes]) -> dict[str, Any] | None:
        stdin: bytes | None = json.dumps(job.task).encode()
        started = time.monotonic()
        grace_until: float | None = None
        while True:
            try:
                out, err = proc.communicate(stdin, timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                stdin = None  # already handed over; a retry must not send it again
            now = time.monotonic()
            if job.cancelled.is_set():  # SPEC 4.11: SIGTERM, the grace, then SIGKILL
                self._kill(proc, wait_s=self.grace_s)
                raise ReleaseTask("cancelled")
            if job.lease_lost.is_set():
                self._kill(proc)
                raise ReleaseTask("lease lost")
            if self.timeout_s is not None and now - started >= self.timeout_s:
                out, err = self._kill(proc)
                raise ValidationFailed(f"timeout after {self.timeout_s:g}s",
                                       result=self._failure_result(None, err))
            if job.stopping.is_set():
                grace_until = grace_until if grace_until is not None else now + self.grace_s
                if self.hurry.is_set() or now >= grace_until:
                    self._kill(proc)
                    raise ReleaseTask(f"shutdown grace of {self.grace_s:g}s ran out")
        if proc.returncode != 0:
            raise ValidationFailed(self._reason(proc.returncode, err),
                                   result=self._failure_result(proc.returncode, err))
        return self._success_result(out)

    def _kill(self, proc: subprocess.Popen[bytes], wait_s: float | None = None
              ) -> tuple[bytes, bytes]:
        """SIGTERM the group, SIGKILL it after ``wait_s`` (default ``kill_wait_s``; and in
        any case, for children that outlive the leader), then reap."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=self.kill_wait_s if wait_s is None else wait_s)
        except subprocess.TimeoutExpired:
            out, err = b"", b""
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild escaped with our pipes
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
                proc.wait(5)
        return out or b"", err or b""

    @staticmethod
    def _reason(code: int, err: bytes) -> str:
        for line in reversed(err.decode("utf-8", "replace").splitlines()):
            if line.strip():
                return line.strip()
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                pass
        return f"exit code {code}"

    def _failure_result(self, code: int | None, err: bytes) -> dict[str, Any]:
        text = err.decode("utf-8", "replace")
        return {"exitCode": code, "stderr": text[-STDERR_KEPT_CHARS:]}

    def _success_result(self, out: bytes) -> dict[str, Any]:
        text = out.decode("utf-8", "replace")
        try:
            parsed = json.loads(text) if text.strip() else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and _size(parsed) <= self.result_max_bytes:
            return parsed
        result: dict[str, Any] = {"stdout": text}
        if _size(result) > self.result_max_bytes:
            # keep the end (where summaries usually are), within the limit with room to spare
            keep = max(0, self.result_max_bytes // 2 - 100)
            result = {"stdout": text[-keep:] if keep else "", "truncated": True,
                      "stdoutChars": len(text)}
        return result


def _size(obj: dict[str, Any]) -> int:
    return len(json.dumps(obj))


_PR_SET_PDEATHSIG = 1
try:  # looked up once here: the child between fork and exec should do as little as it can
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the worker dies (Linux; elsewhere the
    watchdog alone)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


# The watchdog: reads "+pgid"/"-pgid" lines; at EOF (the worker is gone) SIGKILLs every
# group still listed. Ignores SIGINT/SIGTERM (a Ctrl-C meant for the worker's terminal).
# Its first line names it in ``ps`` (and to the tests' leftover-process check).
WATCHDOG_NAME = "autonomy command watchdog"
_WATCHDOG_SRC = f"""# {WATCHDOG_NAME}
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    try:
        pgid = int(line[1:])
    except ValueError:
        continue
    (groups.add if line[0] == "+" else groups.discard)(pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class _Watchdog:
    """One watchdog process per worker process, started with the first command."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = 0
        self._closer = False  # close() registered with atexit

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                try:
                    self._proc = subprocess.Popen(
                        [sys.executable, "-I", "-S", "-c", _WATCHDOG_SRC],
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, start_new_session=True)
                    self._pid = os.getpid()
                    if not self._closer:
                        atexit.register(self.close)
                        self._closer = True
                except OSError:
                    self._proc = None
                    return  # the parent-death signal still covers the command itself
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(line.encode())
                self._proc.stdin.flush()
            except OSError:
                self._proc = None

    def close(self) -> None:
        """At this process's normal exit: end the watchdog (EOF: it kills any group still
        listed, then exits) and reap it, instead of leaving it to the pipe's teardown."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or self._pid != os.getpid() or proc.stdin is None:
                return
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")


_WATCHDOG = _Watchdog()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pid, sig)
