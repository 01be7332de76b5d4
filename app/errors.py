"""The error tree. Every error has a stable ``code`` and an HTTP status.

::

    AutonomyError                      internal_error        500
    ├── InvalidInput                   invalid_input         400
    │   ├── InvalidAssignee            invalid_assignee
    │   ├── InvalidWorker              invalid_worker
    │   ├── InvalidTitle               invalid_title
    │   ├── InvalidOutcome             invalid_outcome
    │   ├── InvalidPayload             invalid_payload
    │   ├── InvalidReason              invalid_reason
    │   ├── InvalidAction              invalid_action
    │   ├── InvalidLeaseToken          invalid_lease_token
    │   ├── PortInUse                  port_in_use
    │   └── InvalidSettings            invalid_settings
    ├── NotFound                       not_found             404
    │   └── TaskNotFound               task_not_found
    ├── Conflict                       conflict              409
    │   ├── LanePaused                 lane_paused
    │   ├── NotInProgress              not_in_progress
    │   ├── StaleLease                 stale_lease
    │   ├── DowngradeRefused           downgrade_refused
    │   ├── DeploymentMismatch         deployment_mismatch
    │   ├── TaskCancelled              task_cancelled
    │   ├── TaskFinished               task_finished
    │   └── NotDead                    not_dead
    ├── AuthError                      unauthorized          401
    │   └── Forbidden                  forbidden             403
    │       └── ForbiddenScope         forbidden_scope
    └── Unavailable                    unavailable           503
        ├── DatabaseUnavailable        database_unavailable
        ├── DatabaseNotMigrated        database_not_migrated
        ├── DatabaseBusy               database_busy
        └── RedisUnavailable           redis_unavailable

Third-party errors (redis, SQLAlchemy) are translated at the boundary with
``raise ... from e``; adapters turn any ``AutonomyError`` into
``{"ok": false, "error": code, "message": ..., **details}``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AutonomyError(Exception):
    """Raised when an operation cannot be done; the root of every error here."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The JSON answer for this error."""
        return {"ok": False, "error": self.code, "message": self.message, **self.details}


class InvalidInput(AutonomyError):
    """Raised when a request's fields are missing, malformed or out of range."""

    code = "invalid_input"
    http_status = 400


class InvalidAssignee(InvalidInput):
    """Raised when an assignee (lane name) is empty, too long or has odd characters."""

    code = "invalid_assignee"


class InvalidWorker(InvalidInput):
    """Raised when a worker name is empty, too long or has odd characters."""

    code = "invalid_worker"


class InvalidTitle(InvalidInput):
    """Raised when a task title is empty or too long."""

    code = "invalid_title"


class InvalidOutcome(InvalidInput):
    """Raised when an outcome is neither ``success`` nor ``failure``."""

    code = "invalid_outcome"


class InvalidPayload(InvalidInput):
    """Raised when a payload or result is not a JSON object, or too large."""

    code = "invalid_payload"


class InvalidReason(InvalidInput):
    """Raised when a failure has no validation reason, or a reason is too long."""

    code = "invalid_reason"


class InvalidAction(InvalidInput):
    """Raised when an API action is unknown."""

    code = "invalid_action"


class InvalidLeaseToken(InvalidInput):
    """Raised when a lease token is empty or malformed."""

    code = "invalid_lease_token"


class PortInUse(InvalidInput):
    """Raised when ``autonomy up`` is asked to serve on a port another process holds."""

    code = "port_in_use"


class InvalidSettings(InvalidInput):
    """Raised when a setting (an ``AUTONOMY_*`` variable, ``REDIS_URL``...) cannot be
    used: a process says which and why, in one line, and does not start."""

    code = "invalid_settings"


class NotFound(AutonomyError):
    """Raised when the thing asked for does not exist."""

    code = "not_found"
    http_status = 404


class TaskNotFound(NotFound):
    """Raised when no task has the given id."""

    code = "task_not_found"


class Conflict(AutonomyError):
    """Raised when the request is well formed but the state refuses it."""

    code = "conflict"
    http_status = 409


class LanePaused(Conflict):
    """Raised when a claim is made on a paused lane."""

    code = "lane_paused"


class NotInProgress(Conflict):
    """Raised when a task that is not in progress is completed or heartbeaten."""

    code = "not_in_progress"


class StaleLease(Conflict):
    """Raised when a lease token is no longer the task's (fencing)."""

    code = "stale_lease"


class DowngradeRefused(Conflict):
    """Raised when ``autonomy db downgrade`` would lose live work (live leases) or every
    table (to ``base``) and was not given ``--force``; the message names what is at stake."""

    code = "downgrade_refused"


class DeploymentMismatch(Conflict):
    """Raised when a process is pointed at a database that belongs to another deployment
    (another Redis, or another key prefix); the message names both."""

    code = "deployment_mismatch"


class TaskCancelled(Conflict):
    """Raised when the holder of a cancelled task's lease heartbeats, completes or releases
    it: the task was cancelled and its outcome is not recorded."""

    code = "task_cancelled"


class TaskFinished(Conflict):
    """Raised when a task that already finished (``done``, ``dead``) is cancelled."""

    code = "task_finished"


class NotDead(Conflict):
    """Raised when ``requeue`` names a task that is not ``dead``."""

    code = "not_dead"


class AuthError(AutonomyError):
    """Raised when a mutating call has no valid bearer token."""

    code = "unauthorized"
    http_status = 401


class Forbidden(AuthError):
    """Raised when a bearer token is given but wrong."""

    code = "forbidden"
    http_status = 403


class ForbiddenScope(Forbidden):
    """Raised when a valid credential asks for something outside its scope: another
    lane, another worker name, another credential's lease, or an action its scope has
    not (SPEC 4.10)."""

    code = "forbidden_scope"


class Unavailable(AutonomyError):
    """Raised when a backing service cannot be reached."""

    code = "unavailable"
    http_status = 503


class DatabaseUnavailable(Unavailable):
    """Raised when the database cannot be reached or refuses the connection."""

    code = "database_unavailable"


class DatabaseNotMigrated(Unavailable):
    """Raised when the database answers but has no autonomy schema (run the migrations)."""

    code = "database_not_migrated"


class DatabaseBusy(Unavailable):
    """Raised when the database gave up on a lock (deadlock, serialization failure, SQLite
    busy timeout); the call changed nothing and may be retried."""

    code = "database_busy"


class RedisUnavailable(Unavailable):
    """Raised when Redis cannot be reached."""

    code = "redis_unavailable"
