"""The wire shapes of ``POST /api/autonomy``: one request model per action, joined in a
union discriminated on ``action``, and the answers they get. They are what the OpenAPI
schema publishes.

The request models are built per settings from ``app.validate.types`` -- the one
definition of every field's type and limits, which the operations themselves validate
with -- so the OpenAPI document states exactly the limits the server enforces, and the
HTTP API and the CLI refuse the same input with the same code. A shape error is mapped to
the code the domain gives for that field (``invalid_assignee`` for the assignee, ...),
never FastAPI's 422.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal, NamedTuple, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
)

from app import errors, validate
from app.settings import Settings

_TEXT = " Text: no NUL, no lone surrogates."


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _req(tp: Any, description: str) -> Any:
    return (tp, Field(description=description))


def _opt(tp: Any, description: str) -> Any:
    return (tp | None, Field(default=None, description=description))


class RequestSchema(NamedTuple):
    """The request models under one set of limits, their union and its validator."""

    models: tuple[type[_Request], ...]
    union: Any
    adapter: TypeAdapter[Any]


@lru_cache(maxsize=16)
def _build(t: validate.Types) -> RequestSchema:
    obj = dict[str, Any] | str
    actor = _opt(t.worker, "Who asks (for the audit trail).")
    claim_next = create_model("ClaimNext", __base__=_Request,
                              assignee=_req(t.assignee, "The lane."),
                              worker=_req(t.worker, "Who claims: the lease's holder."))
    complete_item = create_model("CompleteItem", __base__=_Request,
                                 taskId=_req(t.task_id, "The task."),
                                 leaseToken=_req(t.lease_token, "Its lease's token."),
                                 result=_opt(obj, "A JSON object kept on the task." + _TEXT))
    specs: list[tuple[str, str, str, dict[str, Any]]] = [
        ("CreateRequest", "Queue a task in a lane.", "create", {
            "assignee": _req(t.assignee, "The lane."),
            "title": _req(t.title, "What to do." + _TEXT),
            "priority": _opt(t.priority, "Higher is claimed first (default 0)."),
            "payload": _opt(obj, "A JSON object (or a string holding one)." + _TEXT),
            "actor": actor,
            "dedupeKey": _opt(t.dedupe_key, "Idempotent create: while the lane has a task "
                              "with this key (kept until retention prunes the task), the "
                              "create answers it with `guard: duplicate_create_guard`."
                              + _TEXT),
            "notBefore": _opt(str, "Not claimable before this ISO-8601 time (with a zone)."
                              + _TEXT),
            "delayS": _opt(t.delay_s, "Not claimable for this many seconds (not with "
                           "`notBefore`).")}),
        ("ClaimRequest", "Claim the lane's next task under a lease.", "claim", {
            "assignee": _req(t.assignee, "The lane."),
            "worker": _req(t.worker, "Who claims."),
            "waitMs": _opt(t.wait_ms, "When the lane has nothing to claim, wait up to this "
                           "long (ms) for work to arrive before answering (a long poll; "
                           "default 0)."),
            "clockSkewMs": _opt(t.clock_skew_ms, "The worker's clock minus the database's "
                                "(ms), as it measured it from answers' `serverTime`: shown "
                                "in status and `/metrics` (leases never depend on it)."),
            "max": _opt(t.claim_max, "A prefetch: grant up to this many leases at once, "
                        "counting those the worker holds in the lane, each a lease of its "
                        "own (answered as `leases`; `task` and `lease` are the first). "
                        "Without it, one lease.")}),
        ("HeartbeatRequest", "Extend a live lease.", "heartbeat", {
            "taskId": _req(t.task_id, "The task."),
            "leaseToken": _req(t.lease_token, "The token the claim answered."),
            "clockSkewMs": _opt(t.clock_skew_ms, "The worker's clock minus the database's "
                                "(ms), as it measured it from answers' `serverTime`: shown "
                                "in status and `/metrics` (leases never depend on it).")}),
        ("CompleteRequest", "Finish a leased task with success, or with a validation "
         "failure.", "complete", {
            "taskId": _req(t.task_id, "The task."),
            "leaseToken": _req(t.lease_token, "The token the claim answered."),
            "outcome": _req(Literal["success", "failure"], "How it went."),
            "validationReason": _opt(t.reason, "Why it failed (required for a failure)."
                                     + _TEXT),
            "result": _opt(obj, "A JSON object kept on the task." + _TEXT),
            "actor": _opt(t.worker, "Who completes (default: the lease holder)."),
            "claimNext": _opt(claim_next, "Once the outcome is recorded, claim this "
                              "worker's next task in this lane and answer it as `next` "
                              "(what `claim` answers; left out when that claim is "
                              "refused): a worker's cycle in one request."),
            "clockSkewMs": _opt(t.clock_skew_ms, "The worker's clock minus the database's "
                                "(ms), as it measured it from answers' `serverTime`: shown "
                                "in status and `/metrics` (leases never depend on it).")}),
        ("CompleteManyRequest", "Finish several leased tasks with success in one "
         "statement and one commit, each fenced by its own token, each with its own event; "
         "an item refused (a stale token) is answered alone in `results`.",
         "complete_many", {
            "items": _req(list[complete_item],  # type: ignore[valid-type]
                          "The leases to complete (1 to "
                          f"{validate.CLAIM_MAX_MAX})."),
            "actor": _opt(t.worker, "Who completes (default: each lease's holder)."),
            "claimNext": _opt(claim_next, "Once recorded, claim up to `max` next leases "
                              "for this worker in this lane, answered as `next` (what "
                              "`claim` with `max` answers)."),
            "max": _opt(t.claim_max, "How many leases `claimNext` may hand over, counting "
                        "those the worker still holds (default 1)."),
            "clockSkewMs": _opt(t.clock_skew_ms, "As `complete` takes it.")}),
        ("ReleaseRequest", "Give a lease back without an outcome.", "release", {
            "taskId": _req(t.task_id, "The task."),
            "leaseToken": _req(t.lease_token, "The token the claim answered."),
            "actor": _opt(t.worker, "Who releases.")}),
        ("PauseLaneRequest", "Pause a lane (idempotent).", "pause_lane", {
            "assignee": _req(t.assignee, "The lane."),
            "reason": _opt(t.reason, "Why." + _TEXT),
            "actor": _opt(t.worker, "Who pauses.")}),
        ("ResumeLaneRequest", "Resume a lane (idempotent); restarts the breaker's counting "
         "window.", "resume_lane", {
            "assignee": _req(t.assignee, "The lane."),
            "reason": _opt(t.reason, "Why." + _TEXT),
            "actor": _opt(t.worker, "Who resumes.")}),
        ("ConfigureLaneRequest", "Set how many live leases a lane allows at once, and its "
         "task lifecycle (give at least one).", "configure_lane", {
            "assignee": _req(t.assignee, "The lane."),
            "maxInFlight": _opt(t.max_in_flight, "Live leases allowed at once."),
            "maxAttempts": _opt(t.max_attempts, "Failures after which a task ends `dead`."),
            "backoffBaseS": _opt(t.backoff_s, "A failed task waits min(cap, base * "
                                 "2^attempts) s (+- jitter) before it is claimable again."),
            "backoffCapS": _opt(t.backoff_s, "The longest backoff (s)."),
            "actor": _opt(t.worker, "Who configures.")}),
        ("FingerprintCountRequest", "Count one failure fingerprint's hits in a window.",
         "fingerprint_count", {
            "fingerprint": _req(t.fingerprint, "``{assignee}:{normalised reason}``." + _TEXT),
            "windowHours": _opt(t.window_hours, "Window (default: the breaker window).")}),
        ("HistoryRequest", "A task's or a lane's events; give exactly one of ``taskId`` "
         "and ``assignee``.", "history", {
            "taskId": _opt(t.task_id, "The task."),
            "assignee": _opt(t.assignee, "The lane.")}),
        ("StatusRequest", "The status payload (the same as ``GET /api/autonomy/status``).",
         "status", {}),
        ("OpsIncidentRequest", "Set the ops incident state (written with the time it was "
         "written).", "ops_incident", {
            "status": _req(Literal["ok", "warning", "critical"], "The state."),
            "reason": _opt(t.reason, "What is going on." + _TEXT),
            "actor": _opt(t.worker, "Who sets it.")}),
        ("CancelRequest", "End a `todo` or `in_progress` task as `cancelled`; its lease "
         "holder's heartbeat and complete then answer `task_cancelled`.", "cancel", {
            "taskId": _req(t.task_id, "The task."),
            "actor": _opt(t.worker, "Who cancels.")}),
        ("RequeueRequest", "Bring a `dead` task back to `todo`, its attempts reset.",
         "requeue", {
            "taskId": _req(t.task_id, "The task."),
            "actor": _opt(t.worker, "Who requeues.")}),
        ("TasksRequest", "Tasks newest first, filtered; the next page with `after` = the "
         "answer's `nextAfter`.", "tasks", {
            "assignee": _opt(t.assignee, "Only this lane."),
            "status": _opt(Literal["todo", "in_progress", "done", "cancelled", "dead"],
                           "Only this status."),
            "kind": _opt(Literal["work", "ops_remediation"], "Only this kind."),
            "limit": _opt(t.list_limit, "At most this many (default 50)."),
            "after": _opt(t.task_id, "The last id of the previous page.")}),
    ]
    models = tuple(
        create_model(name, __base__=_Request, __doc__=doc,
                     action=_req(Literal[action], "The action."), **fields)
        for name, doc, action, fields in specs)
    union: Any = Annotated[tuple_union(models), Field(discriminator="action")]
    return RequestSchema(models, union, TypeAdapter(union))


def tuple_union(models: tuple[type[BaseModel], ...]) -> Any:
    """``models[0] | models[1] | ...``."""
    out: Any = models[0]
    for m in models[1:]:
        out = out | m
    return out


def request_schema(s: Settings) -> RequestSchema:
    """The request models under ``s``'s limits."""
    return _build(validate.types(s))


# a shape error in this field is refused with the code the domain gives for it
_FIELD_ERRORS: dict[str, type[errors.InvalidInput]] = {
    "assignee": errors.InvalidAssignee, "worker": errors.InvalidWorker,
    "actor": errors.InvalidWorker, "title": errors.InvalidTitle,
    "outcome": errors.InvalidOutcome, "payload": errors.InvalidPayload,
    "result": errors.InvalidPayload, "validationReason": errors.InvalidReason,
    "reason": errors.InvalidReason, "leaseToken": errors.InvalidLeaseToken,
}


def check_shape(body: dict[str, Any], s: Settings) -> None:
    """Raise the ``InvalidInput`` the first shape or limit error of ``body`` stands for."""
    try:
        request_schema(s).adapter.validate_python(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raise errors.InvalidAction(
                f"unknown action {body.get('action')!r}; known: "
                f"{', '.join(sorted(action_names()))}",
                actions=sorted(action_names())) from None
        loc = [str(p) for p in first["loc"][1:]]
        field = loc[0] if loc else "request"
        # a nested field (``claimNext.worker``) gets its own field's code
        inner = loc[1] if field == "claimNext" and len(loc) > 1 else field
        cls = _FIELD_ERRORS.get(inner, errors.InvalidInput)
        raise cls(f"{'.'.join(loc) or field}: {first['msg']}", field=field) from None


def action_names() -> list[str]:
    """Every action the request union describes."""
    models = _build(validate.types(validate.DEFAULT_LIMITS)).models
    return [get_args(m.model_fields["action"].annotation)[0] for m in models]


# --- answers -------------------------------------------------------------------------


# every time on the wire: ISO-8601 UTC with a zone (``app.clock.iso``); declared as a
# date-time so the OpenAPI schema says so (the routes answer JSON already encoded)
Time = AwareDatetime


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
    status: Literal["todo", "in_progress", "done", "cancelled", "dead"]
    priority: int
    payload: dict[str, Any]
    result: dict[str, Any] | None = None
    attempts: int
    claimedBy: str | None
    leaseExpiresAt: Time | None
    failureFingerprint: str | None
    lastValidationReason: str | None
    lanePaused: bool
    lanePausedReason: str | None
    lanePausedAt: Time | None
    createdAt: Time
    updatedAt: Time
    completedAt: Time | None
    notBefore: Time | None = None
    dedupeKey: str | None = None


class LaneWire(BaseModel):
    """A lane and its pause state."""

    model_config = ConfigDict(extra="allow")

    assignee: str
    paused: bool
    pausedReason: str | None
    pausedAt: Time | None
    resumedAt: Time | None
    maxInFlight: int
    maxAttempts: int | None = None
    backoffBaseS: float | None = None
    backoffCapS: float | None = None


class Lease(BaseModel):
    token: str
    expiresAt: Time


class TaskAnswer(_Answer):
    """``create``, ``claim`` and ``complete``: the task (``null`` when nothing to claim),
    a ``lease`` for a claim, ``guard`` when a duplicate was refused, and the breaker's
    fields for a failure (``failureFingerprint``, ``fingerprintCount``, ``lanePaused``,
    ``remediationTaskId``)."""

    task: TaskWire | None
    lease: Lease | None = None
    guard: Literal["duplicate_claim_guard", "duplicate_complete_guard",
                   "duplicate_create_guard"] | None = None
    leaseHolder: str | None = None
    leaseExpiresAt: Time | None = None
    failureFingerprint: str | None = None
    fingerprintCount: int | None = None
    lanePaused: bool | None = None
    remediationTaskId: int | None = None
    next: TaskAnswer | None = Field(default=None, description=(
        "`complete` with `claimNext`: the worker's next claim, as `claim` answers it."))
    leases: list[dict[str, Any]] | None = Field(default=None, description=(
        "`claim` with `max`: every lease granted, `[{task, lease}]`, in claim order."))


class CompleteManyAnswer(_Answer):
    """``complete_many``: one result per item, in order -- ``{ok: true, task}`` (or a
    retry's ``guard``), or ``{ok: false, error, message, taskId}`` for an item refused
    alone -- and ``next`` (``claimNext``): the worker's next leases, as ``claim`` with
    ``max`` answers."""

    results: list[dict[str, Any]]
    next: TaskAnswer | None = None


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
    alreadyPaused: bool | None = Field(default=None, description="`pause_lane`: the lane "
                                       "was paused already (nothing changed).")
    wasPaused: bool | None = Field(default=None, description="`resume_lane`: true when this "
                                   "call lifted a pause, false when the lane was running.")
    alreadyRunning: bool | None = Field(default=None, deprecated=True, description=(
        "`resume_lane`: `not wasPaused`, kept for older clients; read `wasPaused`."))


class FingerprintCountAnswer(_Answer):
    fingerprint: str
    count: int
    windowHours: float
    threshold: int


class EventWire(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int | None
    at: Time | None
    kind: str
    assignee: str | None
    taskId: int | None
    actor: str | None = Field(description="Who did it: under credentials, the credential's "
                              "name.")
    actorNote: str | None = Field(default=None, description="The actor the request itself "
                                  "named, when it differs (a note, never trusted).")
    reason: str | None
    data: dict[str, Any]


class HistoryAnswer(_Answer):
    events: list[EventWire]


class BeatLeaderWire(BaseModel):
    """The beat leader lease (not a run-lock): who leads, since when, when the lease was
    last renewed, its TTL, and the beats standing by."""

    leader: str | None
    since: Time | None
    renewedAt: Time | None
    ttlMs: int
    standbys: list[str]


class FingerprintWire(BaseModel):
    """A recent failure fingerprint as the breaker counts it: ``count`` since
    ``countSince`` (the lane's last resume when that is within the window, else the
    window's start), ``windowCount`` over the whole window."""

    model_config = ConfigDict(extra="allow")

    fingerprint: str
    assignee: str
    count: int
    windowCount: int
    countSince: Time
    sinceResume: bool
    threshold: int
    lastAt: Time | None


class StatusAnswer(_Answer):
    """The status payload: run-locks, lanes, handoff, ops incident, readiness, self-heal,
    failure fingerprints and counters (each persisted signal with its ``stale`` flag and
    an ``error`` when it is missing or unreadable)."""

    generatedAt: Time
    redis: Literal["ok", "degraded"] = Field(
        description="`degraded` while Redis is down or stalled: the database answers alone.")
    workflowHealth: dict[str, Any]
    beat: BeatLeaderWire
    lanes: list[LaneWire]
    handoff: dict[str, Any]
    opsIncident: dict[str, Any]
    readiness: dict[str, Any]
    selfHeal: dict[str, Any]
    fingerprints: list[FingerprintWire]
    metrics: dict[str, Any]


class OpsIncidentAnswer(_Answer):
    """``ops_incident``: the state as written."""


class TasksAnswer(_Answer):
    """``GET /api/autonomy/tasks`` and the ``tasks`` action: tasks, newest first; with the
    action, ``nextAfter`` asks for the next page (null on the last)."""

    tasks: list[TaskWire]
    nextAfter: int | None = None


class CancelAnswer(_Answer):
    """``cancel``: the task as it is now; ``alreadyCancelled`` when it was."""

    task: TaskWire
    alreadyCancelled: bool


class ErrorAnswer(BaseModel):
    """Every refusal: a stable ``error`` code, a human ``message``, and details."""

    model_config = ConfigDict(extra="allow")

    ok: Literal[False]
    error: str
    message: str


# what each action answers; the HTTP answer also echoes ``action``, the discriminator
ANSWERS: dict[str, type[_Answer]] = {
    "create": TaskAnswer, "claim": TaskAnswer, "heartbeat": LeaseAnswer,
    "complete": TaskAnswer, "complete_many": CompleteManyAnswer, "release": ReleaseAnswer,
    "pause_lane": LaneAnswer,
    "resume_lane": LaneAnswer, "configure_lane": LaneAnswer,
    "fingerprint_count": FingerprintCountAnswer, "history": HistoryAnswer,
    "status": StatusAnswer, "ops_incident": OpsIncidentAnswer, "cancel": CancelAnswer,
    "requeue": TaskAnswer, "tasks": TasksAnswer,
}


def _camel(action: str) -> str:
    return "".join(part.capitalize() for part in action.split("_"))


def _action_answers() -> tuple[type[_Answer], ...]:
    """One model per action (``ClaimActionAnswer``, ...): its answer's fields and
    ``action``, the request's action echoed."""
    return tuple(
        create_model(f"{_camel(action)}ActionAnswer", __base__=base,
                     __doc__=f"The answer to `{action}`. " + (base.__doc__ or ""),
                     action=_req(Literal[action],
                                 "The action answered (the request's, echoed)."))
        for action, base in ANSWERS.items())


ACTION_ANSWERS = _action_answers()
# the 200 answer of ``POST /api/autonomy``: a oneOf discriminated on ``action``
ActionAnswer: Any = Annotated[tuple_union(ACTION_ANSWERS), Field(discriminator="action")]
ACTION_ANSWER: TypeAdapter[Any] = TypeAdapter(ActionAnswer)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorAnswer, "description": "Bad input (`invalid_*`)."},
    401: {"model": ErrorAnswer, "description": "No credential (`unauthorized`)."},
    403: {"model": ErrorAnswer, "description": "Not a live credential (`forbidden`), or "
          "one whose scope does not allow this (`forbidden_scope`: another lane, another "
          "worker name, another credential's lease, an action of another scope)."},
    404: {"model": ErrorAnswer, "description": "Not found (`task_not_found`)."},
    409: {"model": ErrorAnswer,
          "description": "Refused by state (`lane_paused`, `not_in_progress`, `stale_lease`)."},
    503: {"model": ErrorAnswer, "description": "Database or Redis unreachable "
          "(`database_unavailable`, `redis_unavailable`), the database not migrated "
          "(`database_not_migrated`) or busy (`database_busy`, retry)."},
}
