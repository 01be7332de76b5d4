"""The wire shapes of ``POST /api/autonomy``: one request model per action, joined in a
union discriminated on ``action``, and the answers they get. They are what the OpenAPI
schema publishes.

The request models check the JSON *shape* (required fields, JSON types, enums) in strict
mode; ranges, lengths and characters are left to ``app.validate`` behind ``app.ops``,
so the HTTP API and the CLI refuse the same input with the same code. A shape error is
mapped to the code the domain would give for that field (``invalid_assignee`` for the
assignee, ...), never FastAPI's 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from app import errors

# documentation only (see the module docstring): what app.validate accepts by default
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
_WORKER = r"^[A-Za-z0-9][A-Za-z0-9_.:@/\-]*$"
_TOKEN = r"^[0-9a-f]{32}$"


def _doc(description: str, **schema: Any) -> Any:
    return Field(description=description, json_schema_extra=schema or None)


def _opt(description: str, **schema: Any) -> Any:
    return Field(default=None, description=description, json_schema_extra=schema or None)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class CreateRequest(_Request):
    """Queue a task in a lane."""

    action: Literal["create"]
    assignee: str = _doc("The lane.", pattern=_NAME, maxLength=64)
    title: str = _doc("What to do.", minLength=1, maxLength=500)
    priority: int | None = _opt("Higher is claimed first (default 0).",
                                minimum=-1_000_000, maximum=1_000_000)
    payload: dict[str, Any] | str | None = _opt("A JSON object (or a string holding one).")
    actor: str | None = _opt("Who asks (for the audit trail).", pattern=_WORKER, maxLength=128)


class ClaimRequest(_Request):
    """Claim the lane's next task under a lease."""

    action: Literal["claim"]
    assignee: str = _doc("The lane.", pattern=_NAME, maxLength=64)
    worker: str = _doc("Who claims.", pattern=_WORKER, maxLength=128)


class HeartbeatRequest(_Request):
    """Extend a live lease."""

    action: Literal["heartbeat"]
    taskId: int = _doc("The task.", minimum=1, maximum=2**31 - 1)
    leaseToken: str = _doc("The token the claim answered.", pattern=_TOKEN)


class CompleteRequest(_Request):
    """Finish a leased task with success, or with a validation failure."""

    action: Literal["complete"]
    taskId: int = _doc("The task.", minimum=1, maximum=2**31 - 1)
    leaseToken: str = _doc("The token the claim answered.", pattern=_TOKEN)
    outcome: Literal["success", "failure"]
    validationReason: str | None = _opt("Why it failed (required for a failure).",
                                        maxLength=2000)
    result: dict[str, Any] | str | None = _opt("A JSON object kept on the task.")
    actor: str | None = _opt("Who completes (default: the lease holder).", pattern=_WORKER,
                             maxLength=128)


class ReleaseRequest(_Request):
    """Give a lease back without an outcome."""

    action: Literal["release"]
    taskId: int = _doc("The task.", minimum=1, maximum=2**31 - 1)
    leaseToken: str = _doc("The token the claim answered.", pattern=_TOKEN)
    actor: str | None = _opt("Who releases.", pattern=_WORKER, maxLength=128)


class PauseLaneRequest(_Request):
    """Pause a lane (idempotent)."""

    action: Literal["pause_lane"]
    assignee: str = _doc("The lane.", pattern=_NAME, maxLength=64)
    reason: str | None = _opt("Why.", maxLength=2000)
    actor: str | None = _opt("Who pauses.", pattern=_WORKER, maxLength=128)


class ResumeLaneRequest(_Request):
    """Resume a lane (idempotent); restarts the breaker's counting window."""

    action: Literal["resume_lane"]
    assignee: str = _doc("The lane.", pattern=_NAME, maxLength=64)
    reason: str | None = _opt("Why.", maxLength=2000)
    actor: str | None = _opt("Who resumes.", pattern=_WORKER, maxLength=128)


class ConfigureLaneRequest(_Request):
    """Set how many live leases a lane allows at once."""

    action: Literal["configure_lane"]
    assignee: str = _doc("The lane.", pattern=_NAME, maxLength=64)
    maxInFlight: int = _doc("Live leases allowed at once.", minimum=1, maximum=10_000)
    actor: str | None = _opt("Who configures.", pattern=_WORKER, maxLength=128)


class FingerprintCountRequest(_Request):
    """Count one failure fingerprint's hits in a window."""

    action: Literal["fingerprint_count"]
    fingerprint: str = _doc("``{assignee}:{normalised reason}``.", minLength=1, maxLength=400)
    windowHours: float | None = _opt("Window (default: the breaker window).",
                                     exclusiveMinimum=0, maximum=24 * 366)


class HistoryRequest(_Request):
    """A task's or a lane's events; give exactly one of ``taskId`` and ``assignee``."""

    action: Literal["history"]
    taskId: int | None = _opt("The task.", minimum=1, maximum=2**31 - 1)
    assignee: str | None = _opt("The lane.", pattern=_NAME, maxLength=64)


class StatusRequest(_Request):
    """The status payload (the same as ``GET /api/autonomy/status``)."""

    action: Literal["status"]


class OpsIncidentRequest(_Request):
    """Set the ops incident state (written with the time it was written)."""

    action: Literal["ops_incident"]
    status: Literal["ok", "warning", "critical"]
    reason: str | None = _opt("What is going on.", maxLength=2000)
    actor: str | None = _opt("Who sets it.", pattern=_WORKER, maxLength=128)


ActionRequest = Annotated[
    CreateRequest | ClaimRequest | HeartbeatRequest | CompleteRequest | ReleaseRequest
    | PauseLaneRequest | ResumeLaneRequest | ConfigureLaneRequest | FingerprintCountRequest
    | HistoryRequest | StatusRequest | OpsIncidentRequest,
    Field(discriminator="action"),
]
REQUEST_MODELS: tuple[type[_Request], ...] = (
    CreateRequest, ClaimRequest, HeartbeatRequest, CompleteRequest, ReleaseRequest,
    PauseLaneRequest, ResumeLaneRequest, ConfigureLaneRequest, FingerprintCountRequest,
    HistoryRequest, StatusRequest, OpsIncidentRequest)
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ActionRequest)

# a shape error in this field is refused with the code the domain gives for it
_FIELD_ERRORS: dict[str, type[errors.InvalidInput]] = {
    "assignee": errors.InvalidAssignee, "worker": errors.InvalidWorker,
    "actor": errors.InvalidWorker, "title": errors.InvalidTitle,
    "outcome": errors.InvalidOutcome, "payload": errors.InvalidPayload,
    "result": errors.InvalidPayload, "validationReason": errors.InvalidReason,
    "reason": errors.InvalidReason, "leaseToken": errors.InvalidLeaseToken,
}


def check_shape(body: dict[str, Any]) -> None:
    """Raise the ``InvalidInput`` the first shape error of ``body`` stands for."""
    try:
        _ADAPTER.validate_python(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raise errors.InvalidAction(
                f"unknown action {body.get('action')!r}; known: "
                f"{', '.join(sorted(_actions()))}", actions=sorted(_actions())) from None
        loc = [str(p) for p in first["loc"][1:]]
        field = loc[0] if loc else "request"
        cls = _FIELD_ERRORS.get(field, errors.InvalidInput)
        raise cls(f"{'.'.join(loc) or field}: {first['msg']}", field=field) from None


def _actions() -> list[str]:
    return [get_args(m.model_fields["action"].annotation)[0] for m in REQUEST_MODELS]


def action_names() -> list[str]:
    """Every action the request union describes."""
    return _actions()


# --- answers -------------------------------------------------------------------------


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")

    ok: Literal[True]


class TaskWire(BaseModel):
    """A task as the API shows it (never its lease token)."""

    model_config = ConfigDict(extra="allow")

    id: int
    title: str
    assignee: str
    kind: str
    status: Literal["todo", "in_progress", "done", "cancelled"]
    priority: int
    payload: dict[str, Any]
    result: dict[str, Any] | None = None
    attempts: int
    claimedBy: str | None
    leaseExpiresAt: str | None
    failureFingerprint: str | None
    lastValidationReason: str | None
    lanePaused: bool
    lanePausedReason: str | None
    lanePausedAt: str | None
    createdAt: str
    updatedAt: str
    completedAt: str | None


class LaneWire(BaseModel):
    """A lane and its pause state."""

    model_config = ConfigDict(extra="allow")

    assignee: str
    paused: bool
    pausedReason: str | None
    pausedAt: str | None
    resumedAt: str | None
    maxInFlight: int


class Lease(BaseModel):
    token: str
    expiresAt: str


class TaskAnswer(_Answer):
    """``create``, ``claim`` and ``complete``: the task (``null`` when nothing to claim),
    a ``lease`` for a claim, ``guard`` when a duplicate was refused, and the breaker's
    fields for a failure (``failureFingerprint``, ``fingerprintCount``, ``lanePaused``,
    ``remediationTaskId``)."""

    task: TaskWire | None
    lease: Lease | None = None
    guard: Literal["duplicate_claim_guard", "duplicate_complete_guard"] | None = None
    leaseHolder: str | None = None
    leaseExpiresAt: str | None = None
    failureFingerprint: str | None = None
    fingerprintCount: int | None = None
    lanePaused: bool | None = None
    remediationTaskId: int | None = None


class LeaseAnswer(_Answer):
    """``heartbeat``: the extended lease."""

    taskId: int
    lease: Lease


class ReleaseAnswer(_Answer):
    taskId: int
    released: bool


class LaneAnswer(_Answer):
    """``pause_lane``, ``resume_lane``, ``configure_lane``."""

    lane: LaneWire | None
    alreadyPaused: bool | None = None
    alreadyRunning: bool | None = None


class FingerprintCountAnswer(_Answer):
    fingerprint: str
    count: int
    windowHours: float
    threshold: int


class EventWire(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int | None
    at: str | None
    kind: str
    assignee: str | None
    taskId: int | None
    actor: str | None
    reason: str | None
    data: dict[str, Any]


class HistoryAnswer(_Answer):
    events: list[EventWire]


class StatusAnswer(_Answer):
    """The status payload: run-locks, lanes, handoff, ops incident, readiness, self-heal,
    failure fingerprints and counters (each persisted signal with its ``stale`` flag and
    an ``error`` when it is missing or unreadable)."""

    generatedAt: str
    redis: Literal["ok", "degraded"] = Field(
        description="`degraded` while Redis is down or stalled: the database answers alone.")
    workflowHealth: dict[str, Any]
    lanes: list[dict[str, Any]]
    handoff: dict[str, Any]
    opsIncident: dict[str, Any]
    readiness: dict[str, Any]
    selfHeal: dict[str, Any]
    fingerprints: list[dict[str, Any]]
    metrics: dict[str, Any]


class OpsIncidentAnswer(_Answer):
    """``ops_incident``: the state as written."""


class TasksAnswer(_Answer):
    """``GET /api/autonomy/tasks``: recent tasks, newest first."""

    tasks: list[TaskWire]


class ErrorAnswer(BaseModel):
    """Every refusal: a stable ``error`` code, a human ``message``, and details."""

    model_config = ConfigDict(extra="allow")

    ok: Literal[False]
    error: str
    message: str


ActionAnswer = (TaskAnswer | LeaseAnswer | ReleaseAnswer | LaneAnswer | FingerprintCountAnswer
                | HistoryAnswer | StatusAnswer | OpsIncidentAnswer)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorAnswer, "description": "Bad input (`invalid_*`)."},
    401: {"model": ErrorAnswer, "description": "No bearer token (`unauthorized`)."},
    403: {"model": ErrorAnswer, "description": "Wrong bearer token (`forbidden`)."},
    404: {"model": ErrorAnswer, "description": "Not found (`task_not_found`)."},
    409: {"model": ErrorAnswer,
          "description": "Refused by state (`lane_paused`, `not_in_progress`, `stale_lease`)."},
    503: {"model": ErrorAnswer, "description": "Database or Redis unreachable "
          "(`database_unavailable`, `redis_unavailable`), the database not migrated "
          "(`database_not_migrated`) or busy (`database_busy`, retry)."},
}
