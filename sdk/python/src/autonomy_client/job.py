"""A claimed task as a handler sees it, and how a handler reports its outcome.

A plain handler is ``handler(task: dict) -> dict | None``: the answer is the task's
result; ``ValidationFailed(reason)`` fails the task (the breaker counts the reason); any
other exception fails it with its message; ``ReleaseTask`` gives the lease back without
an outcome. A ``JobHandler`` also sees the lease and the worker's stop signal.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


class ValidationFailed(Exception):
    """Raised by a handler to fail its task with ``reason``; ``result`` is kept on the task."""

    def __init__(self, reason: str, *, result: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result = result


class ReleaseTask(Exception):
    """Raised by a handler to give the lease back without an outcome (e.g. shutting down)."""


@dataclass
class Job:
    """One claimed task and its lease."""

    task: dict[str, Any]
    lease_token: str
    lease_expires_at: str | None
    lane: str
    worker: str
    stopping: threading.Event  # set when the worker is asked to stop
    lease_lost: threading.Event = field(default_factory=threading.Event)
    # set with ``lease_lost`` when the lease was lost because the task was cancelled
    cancelled: threading.Event = field(default_factory=threading.Event)
    heartbeats: int = 0

    @property
    def task_id(self) -> int:
        """The task's id."""
        return int(self.task["id"])


class JobHandler:
    """Base for handlers that need the ``Job`` (its lease, the stop signal)."""

    def handle_job(self, job: Job) -> dict[str, Any] | None:
        """Do the task; return its result, or raise ``ValidationFailed`` / ``ReleaseTask``."""
        raise NotImplementedError


Handler = Callable[[dict[str, Any]], dict[str, Any] | None] | JobHandler


@dataclass
class WorkerStats:
    """What one worker did."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0  # the lease was gone (expired and moved on) before the outcome landed
    kept: int = 0  # outcomes kept after their lease ran out with the API unreachable
    cancelled: int = 0  # cancelled while held: work stopped, no outcome sent

    @property
    def finished(self) -> int:
        """Tasks with an outcome recorded (success or failure)."""
        return self.succeeded + self.failed

    def as_dict(self) -> dict[str, int]:
        """The counts by name."""
        return asdict(self)


def default_worker_name() -> str:
    """``{hostname}-{pid}``, with characters a worker name may not hold replaced."""
    name = re.sub(r"[^A-Za-z0-9_.:@/\-]", "-", f"{socket.gethostname()}-{os.getpid()}")
    return name.lstrip("-_.:@/") or f"worker-{os.getpid()}"
