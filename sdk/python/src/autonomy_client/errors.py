"""The errors a call can raise, one class per group of the server's stable error codes.

::

    AutonomyError          any refusal; ``code`` is the server's (internal_error, http_502 ...)
    ├── InvalidInput       invalid_input and every invalid_* code (bad lane, worker, payload ...)
    ├── NotFound           not_found
    │   └── TaskNotFound   task_not_found
    ├── Conflict           conflict
    │   ├── LanePaused     lane_paused
    │   ├── NotInProgress  not_in_progress
    │   ├── StaleLease     stale_lease
    │   └── TaskCancelled  task_cancelled: the task was cancelled under its holder
    ├── AuthError          unauthorized
    │   └── Forbidden      forbidden
    └── Unavailable        unavailable, database_*, redis_unavailable, the API unreachable,
                           a gateway's 502/503/504: worth retrying

The classes mirror the server's tree by code only: this package imports nothing of the
server.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AutonomyError(Exception):
    """Raised when the API refuses a call or answers something that is not an answer."""

    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(AutonomyError):
    """Raised when the server refuses a request's fields (any ``invalid_*`` code)."""

    default_code = "invalid_input"


class NotFound(AutonomyError):
    """Raised when what the call names does not exist."""

    default_code = "not_found"


class TaskNotFound(NotFound):
    """Raised when the task id names no task."""

    default_code = "task_not_found"


class Conflict(AutonomyError):
    """Raised when the call conflicts with the task's or lane's state."""

    default_code = "conflict"


class LanePaused(Conflict):
    """Raised by a claim on a paused lane (the breaker tripped, or an operator paused it)."""

    default_code = "lane_paused"


class NotInProgress(Conflict):
    """Raised when a heartbeat, complete or release names a task that is not in progress."""

    default_code = "not_in_progress"


class StaleLease(Conflict):
    """Raised when the lease token is no longer the task's: it expired, or was released,
    and the task moved on (the answer's ``leaseEnded`` says which)."""

    default_code = "stale_lease"


class TaskCancelled(Conflict):
    """The task was cancelled while this worker held its lease: its heartbeat, complete and
    release answer this, and its outcome is not recorded."""

    default_code = "task_cancelled"


class AuthError(AutonomyError):
    """Raised when the bearer token is missing or wrong."""

    default_code = "unauthorized"


class Forbidden(AuthError):
    """Raised when the token may not do this action."""

    default_code = "forbidden"


class Unavailable(AutonomyError):
    """Raised when the API cannot be reached or cannot answer now; retrying may succeed."""

    default_code = "unavailable"


_BY_CODE: dict[str, type[AutonomyError]] = {
    cls.default_code: cls
    for cls in (InvalidInput, NotFound, TaskNotFound, Conflict, LanePaused, NotInProgress,
                StaleLease, TaskCancelled, AuthError, Forbidden, Unavailable)
}
_UNAVAILABLE_CODES = ("database_unavailable", "database_not_migrated", "database_busy",
                      "redis_unavailable")


def error_from_answer(answer: dict[str, Any]) -> AutonomyError:
    """The error an ``{"ok": false, "error": code, "message": ...}`` answer stands for; an
    unknown code becomes ``AutonomyError`` with that code."""
    code = str(answer.get("error") or "internal_error")
    message = str(answer.get("message") or code)
    details = {k: v for k, v in answer.items() if k not in ("ok", "error", "message", "code")}
    cls = _BY_CODE.get(code)
    if cls is None and code.startswith("invalid_"):
        cls = InvalidInput
    elif cls is None and code in _UNAVAILABLE_CODES:
        cls = Unavailable
    return (cls or AutonomyError)(message, code=code, **details)
