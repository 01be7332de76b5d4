"""``CommandRunner``: the handler under ``autonomy worker -- CMD``. Runs CMD once per task.

CMD gets the task as JSON on stdin and in the environment (``AUTONOMY_TASK_ID``,
``AUTONOMY_TASK_TITLE``, ``AUTONOMY_TASK_PAYLOAD`` (JSON), ``AUTONOMY_TASK_ATTEMPTS``,
``AUTONOMY_LANE``, ``AUTONOMY_WORKER``). Exit 0 is success: stdout is the result (the
object itself when stdout is one JSON object, else ``{"stdout": ...}``). Any other exit is
a failure whose validation reason is the last non-empty line of stderr (else
``exit code N``). CMD runs in a process group of its own, so a timeout, a lost lease or an
expired shutdown grace kills everything it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
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
                                    cwd=self.cwd, start_new_session=True)
        except OSError as e:  # not found, not executable: the same failure every time
            raise ValidationFailed(f"cannot run {self.cmd[0]}: {e.strerror or e}") from e
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

    def _kill(self, proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
        """SIGTERM the group, SIGKILL it after ``kill_wait_s`` (and in any case, for
        children that outlive the leader), then reap."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=self.kill_wait_s)
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


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(pid, sig)
