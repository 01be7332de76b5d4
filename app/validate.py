"""Input rules shared by every adapter: each failure is a named ``InvalidInput``.

One definition per rule: ``types(settings)`` answers the pydantic ``Annotated`` type of
every field, its limits taken from the settings. The checks below validate with those
types, and ``app.api.schemas`` builds the HTTP request models (and so the OpenAPI
document) from the same types -- the HTTP API, the CLI and the in-process API refuse the
same input, and the schema promises exactly what the server enforces.

Every string accepted must be storable and answerable (SPEC 4.8): text holding NUL or a
lone UTF-16 surrogate (which cannot be encoded as UTF-8) is refused ``invalid_input``
naming the field, at any depth of a payload or result (``storable``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, NamedTuple, TypeVar

from annotated_types import Ge, Gt, Le
from pydantic import StringConstraints, TypeAdapter, ValidationError

from app.errors import (
    InvalidAssignee,
    InvalidInput,
    InvalidLeaseToken,
    InvalidOutcome,
    InvalidPayload,
    InvalidReason,
    InvalidTitle,
    InvalidWorker,
)
from app.kinds import IncidentStatus, Outcome
from app.settings import Settings

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
WORKER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@/\-]*$"
TOKEN_PATTERN = r"^[0-9a-f]{32}$"
NOT_BLANK = r"\S"  # unanchored: holds at least one non-space character
# the task id column is a 32-bit integer on every backend (PostgreSQL ``integer``)
TASK_ID_MAX = 2**31 - 1
PRIORITY_MAX = 1_000_000
MAX_IN_FLIGHT_MAX = 10_000
FINGERPRINT_MAX_LEN = 400
WINDOW_HOURS_MAX = 24 * 366
OUTCOMES = ("success", "failure")
INCIDENT_STATUSES = ("ok", "warning", "critical")
# the task lifecycle (SPEC 4.11)
DEDUPE_KEY_MAX_LEN = 200
DELAY_S_MAX = 366 * 86400.0
MAX_ATTEMPTS_MAX = 10_000
BACKOFF_S_MAX = 7 * 86400.0
LIST_LIMIT_MAX = 500
CLAIM_MAX_MAX = 100  # leases one claim may grant (a worker's prefetch K)
CLOCK_SKEW_MS_MAX = 366 * 24 * 3600 * 1000  # a year: any real clock error, and no overflow
TASK_STATUSES = ("todo", "in_progress", "done", "cancelled", "dead")
TASK_KINDS = ("work", "ops_remediation")
# kept for callers that name it (the old constant)
MAX_PRIORITY = PRIORITY_MAX


class Types(NamedTuple):
    """The type of every input field, limits included (see ``types``)."""

    assignee: Any
    worker: Any
    title: Any
    reason: Any
    fingerprint: Any
    task_id: Any
    priority: Any
    lease_token: Any
    max_in_flight: Any
    window_hours: Any
    wait_ms: Any
    dedupe_key: Any = None
    delay_s: Any = None
    max_attempts: Any = None
    backoff_s: Any = None
    list_limit: Any = None
    clock_skew_ms: Any = None
    claim_max: Any = None


@lru_cache(maxsize=32)
def _types(assignee_max: int, worker_max: int, title_max: int, reason_max: int,
           wait_max: int = 30_000) -> Types:
    return Types(
        assignee=Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                  max_length=assignee_max,
                                                  pattern=NAME_PATTERN)],
        worker=Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                max_length=worker_max,
                                                pattern=WORKER_PATTERN)],
        title=Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                               max_length=title_max, pattern=NOT_BLANK)],
        reason=Annotated[str, StringConstraints(max_length=reason_max)],
        fingerprint=Annotated[str, StringConstraints(min_length=1,
                                                     max_length=FINGERPRINT_MAX_LEN,
                                                     pattern=NOT_BLANK)],
        task_id=Annotated[int, Ge(1), Le(TASK_ID_MAX)],
        priority=Annotated[int, Ge(-PRIORITY_MAX), Le(PRIORITY_MAX)],
        lease_token=Annotated[str, StringConstraints(pattern=TOKEN_PATTERN)],
        max_in_flight=Annotated[int, Ge(1), Le(MAX_IN_FLIGHT_MAX)],
        window_hours=Annotated[float, Gt(0), Le(WINDOW_HOURS_MAX)],
        wait_ms=Annotated[int, Ge(0), Le(wait_max)],
        dedupe_key=Annotated[str, StringConstraints(min_length=1, max_length=DEDUPE_KEY_MAX_LEN,
                                                    pattern=NOT_BLANK)],
        delay_s=Annotated[float, Ge(0), Le(DELAY_S_MAX)],
        max_attempts=Annotated[int, Ge(1), Le(MAX_ATTEMPTS_MAX)],
        backoff_s=Annotated[float, Ge(0), Le(BACKOFF_S_MAX)],
        list_limit=Annotated[int, Ge(1), Le(LIST_LIMIT_MAX)],
        clock_skew_ms=Annotated[int, Ge(-CLOCK_SKEW_MS_MAX), Le(CLOCK_SKEW_MS_MAX)],
        claim_max=Annotated[int, Ge(1), Le(CLAIM_MAX_MAX)],
    )


def types(s: Settings) -> Types:
    """The field types under ``s``'s limits (cached per set of limits)."""
    return _types(s.assignee_max_len, s.worker_max_len, s.title_max_len, s.reason_max_len,
                  s.claim_wait_max_ms)


@lru_cache(maxsize=256)
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


T = TypeVar("T")


def _check(tp: Any, value: Any, err: type[InvalidInput], field: str, message: str) -> Any:
    if isinstance(value, str):
        storable(value, field)
    try:
        return _adapter(tp).validate_python(value, strict=True)
    except ValidationError:
        raise err(message, field=field) from None


# --- storable text -------------------------------------------------------------------


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored and answered (NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "must not contain NUL (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text (a lone surrogate at position {e.start})"
    return None


_SCALARS = frozenset({int, float, bool})


def storable(value: Any, field: str, *, max_depth: int | None = None,
             too_deep: type[InvalidInput] = InvalidInput) -> None:
    """Refuse (``invalid_input`` naming the field) any string in ``value`` -- a key or a
    value at any depth -- that cannot be stored and answered, and nesting deeper than
    ``max_depth``. Iterative, so no input can exhaust the stack."""
    if value is None or type(value) in _SCALARS:  # the common case, without the walk
        return
    if type(value) is str and value.isascii() and "\x00" not in value:
        return
    todo: list[tuple[Any, str, int]] = [(value, field, 0)]
    while todo:
        v, where, depth = todo.pop()
        if isinstance(v, str):
            why = text_problem(v)
            if why is not None:
                raise InvalidInput(f"{where} {why}", field=where)
        elif isinstance(v, dict | list | tuple):
            if max_depth is not None and depth >= max_depth:
                raise too_deep(f"{field} nests deeper than {max_depth} levels",
                               field=field)
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                key = f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]"
                if isinstance(k, str):
                    why = text_problem(k)
                    if why is not None:
                        raise InvalidInput(f"a key in {where} {why}", field=where)
                todo.append((x, key, depth + 1))


# --- the fields ----------------------------------------------------------------------


def assignee(value: Any, s: Settings) -> str:
    """A lane name: 1..assignee_max_len of letters, digits, ``_.-``."""
    out: str = _check(types(s).assignee, value, InvalidAssignee, "assignee",
                      f"assignee must be 1 to {s.assignee_max_len} letters, digits and "
                      "_ . - (starting with a letter or digit)")
    return out


def worker(value: Any, s: Settings, *, field: str = "worker") -> str:
    """A worker (or actor) name: 1..worker_max_len of letters, digits, ``_.-:@/``."""
    out: str = _check(types(s).worker, value, InvalidWorker, field,
                      f"{field} must be 1 to {s.worker_max_len} letters, digits and "
                      "_ . - : @ / (starting with a letter or digit)")
    return out


def actor(value: Any, s: Settings) -> str | None:
    """Who asks, for the audit trail (optional): a worker name."""
    return None if value is None else worker(value, s, field="actor")


def title(value: Any, s: Settings) -> str:
    out: str = _check(types(s).title, value, InvalidTitle, "title",
                      f"title must be a non-blank string of at most {s.title_max_len} "
                      "characters")
    return out


def priority(value: Any, s: Settings | None = None) -> int:
    if value is None:
        return 0
    out: int = _check(types(s or DEFAULT_LIMITS).priority, value, InvalidInput, "priority",
                      f"priority must be an integer from -{PRIORITY_MAX} to {PRIORITY_MAX}")
    return out


def json_object(value: Any, s: Settings, *, field: str = "payload",
                optional: bool = True) -> dict[str, Any] | None:
    """A JSON object (a dict, or a string holding one) within ``payload_max_bytes`` and
    ``json_max_depth``, every string in it storable."""
    if value is None:
        if optional:
            return None
        raise InvalidPayload(f"{field} is required", field=field)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidPayload(f"{field} is not UTF-8 text", field=field) from None
    if isinstance(value, str):
        storable(value, field)
        if len(value) > s.payload_max_bytes * 6:  # \\uXXXX escapes at most 6x the size
            raise InvalidPayload(f"{field} is over {s.payload_max_bytes} bytes", field=field)
        try:
            value = json.loads(value, parse_constant=_no_constants)
        except RecursionError:
            raise InvalidPayload(f"{field} nests deeper than {s.json_max_depth} levels",
                                 field=field) from None
        except ValueError as e:
            raise InvalidPayload(f"{field} is not valid JSON: {str(e)[:200]}",
                                 field=field) from None
    if not isinstance(value, dict):
        raise InvalidPayload(f"{field} must be a JSON object", field=field)
    storable(value, field, max_depth=s.json_max_depth, too_deep=InvalidPayload)
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidPayload(f"{field} is not serialisable as JSON: {str(e)[:200]}",
                             field=field) from None
    if size > s.payload_max_bytes:
        raise InvalidPayload(f"{field} is {size} bytes, over {s.payload_max_bytes}",
                             field=field)
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def task_id(value: Any, s: Settings | None = None, *, field: str = "taskId") -> int:
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 20:
        value = int(value.strip())
    out: int = _check(types(s or DEFAULT_LIMITS).task_id, value, InvalidInput, field,
                      f"{field} must be an integer from 1 to {TASK_ID_MAX}")
    return out


def lease_token(value: Any, s: Settings | None = None) -> str:
    out: str = _check(types(s or DEFAULT_LIMITS).lease_token, value, InvalidLeaseToken,
                      "leaseToken", "leaseToken must be the 32-hex token the claim answered")
    return out


def claim_next(value: Any, s: Settings) -> tuple[str, str] | None:
    """``complete``'s optional ``claimNext``: ``{"assignee": lane, "worker": name}``, the
    claim to make once the outcome is recorded; as ``(assignee, worker)``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput("claimNext must be an object with assignee and worker",
                           field="claimNext")
    return assignee(value.get("assignee"), s), worker(value.get("worker"), s)


def outcome(value: Any) -> Outcome:
    if isinstance(value, str):
        storable(value, "outcome")
    try:
        return Outcome(value)
    except (ValueError, TypeError):
        raise InvalidOutcome("outcome must be 'success' or 'failure'",
                             field="outcome") from None


def reason(value: Any, s: Settings, *, required: bool, field: str = "validationReason"
           ) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if isinstance(value, str):
            storable(value, field)
        if required:
            raise InvalidReason(f"{field} is required for a failure", field=field)
        return None
    out: str = _check(types(s).reason, value, InvalidReason, field,
                      f"{field} must be a string of at most {s.reason_max_len} characters")
    return out.strip()


def fingerprint(value: Any) -> str:
    out: str = _check(types(DEFAULT_LIMITS).fingerprint, value, InvalidInput, "fingerprint",
                      "fingerprint must be a non-empty string of at most "
                      f"{FINGERPRINT_MAX_LEN} characters")
    return out


def max_in_flight(value: Any) -> int:
    out: int = _check(types(DEFAULT_LIMITS).max_in_flight, value, InvalidInput, "maxInFlight",
                      f"maxInFlight must be an integer from 1 to {MAX_IN_FLIGHT_MAX}")
    return out


def clock_skew_ms(value: Any, s: Settings) -> int | None:
    """A worker's reported ``clockSkewMs`` (its clock minus the database's, as it measured
    it from the answers' ``serverTime``): optional, at most a year either way."""
    if value is None:
        return None
    out: int = _check(types(s).clock_skew_ms, value, InvalidInput, "clockSkewMs",
                      f"clockSkewMs must be an integer from {-CLOCK_SKEW_MS_MAX} to "
                      f"{CLOCK_SKEW_MS_MAX}")
    return out


def wait_ms(value: Any, s: Settings) -> int:
    """A claim's ``waitMs``: how long it may wait for work on an empty lane, 0 (the
    default: answer at once) to ``claim_wait_max_ms``."""
    if value is None:
        return 0
    out: int = _check(types(s).wait_ms, value, InvalidInput, "waitMs",
                      f"waitMs must be an integer from 0 to {s.claim_wait_max_ms}")
    return out


def claim_max(value: Any) -> int:
    """A claim's ``max``: how many leases it may grant the worker at once, counting those
    it holds (its prefetch K), 1 to ``CLAIM_MAX_MAX``."""
    out: int = _check(types(DEFAULT_LIMITS).claim_max, value, InvalidInput, "max",
                      f"max must be an integer from 1 to {CLAIM_MAX_MAX}")
    return out


def window_hours(value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidInput(f"windowHours must be a number in (0, {WINDOW_HOURS_MAX}]",
                           field="windowHours")
    out: float = _check(types(DEFAULT_LIMITS).window_hours, value, InvalidInput, "windowHours",
                        f"windowHours must be a number in (0, {WINDOW_HOURS_MAX}]")
    return float(out)


def incident_status(value: Any) -> IncidentStatus:
    if isinstance(value, str):
        storable(value, "status")
    if value not in INCIDENT_STATUSES:
        raise InvalidInput("status must be 'ok', 'warning' or 'critical'", field="status")
    return IncidentStatus(value)


def positive_number(value: Any, field: str, *, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= maximum:
        raise InvalidInput(f"{field} must be a number in (0, {maximum}]", field=field)
    return float(value)


# the limits that do not come from settings are the same under any settings
DEFAULT_LIMITS = Settings.model_construct(assignee_max_len=64, worker_max_len=128,
                                     title_max_len=500, reason_max_len=2000)


# --- the task lifecycle (SPEC 4.11) ---------------------------------------------------


def dedupe_key(value: Any) -> str | None:
    """``create``'s optional ``dedupeKey``: 1..200 characters, not blank."""
    if value is None:
        return None
    out: str = _check(types(DEFAULT_LIMITS).dedupe_key, value, InvalidInput, "dedupeKey",
                      f"dedupeKey must be a non-blank string of at most {DEDUPE_KEY_MAX_LEN} "
                      "characters")
    return out


def delay_s(value: Any) -> float | None:
    """``create``'s optional ``delayS``: seconds from now, 0..366 days."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"delayS must be a number of seconds from 0 to {DELAY_S_MAX:.0f}",
                           field="delayS")
    out: float = _check(types(DEFAULT_LIMITS).delay_s, float(value), InvalidInput, "delayS",
                        f"delayS must be a number of seconds from 0 to {DELAY_S_MAX:.0f}")
    return out


def not_before(value: Any) -> datetime | None:
    """``create``'s optional ``notBefore``: an ISO-8601 time with its zone (``Z`` or an
    offset), answered as aware UTC."""
    if value is None:
        return None
    msg = "notBefore must be an ISO-8601 time with a zone, e.g. 2026-12-07T03:00:00Z"
    if not isinstance(value, str):
        raise InvalidInput(msg, field="notBefore")
    storable(value, "notBefore")
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(msg, field="notBefore") from None
    if t.tzinfo is None:
        raise InvalidInput(msg, field="notBefore")
    return t.astimezone(UTC)


def max_attempts(value: Any) -> int | None:
    if value is None:
        return None
    out: int = _check(types(DEFAULT_LIMITS).max_attempts, value, InvalidInput, "maxAttempts",
                      f"maxAttempts must be an integer from 1 to {MAX_ATTEMPTS_MAX}")
    return out


def backoff_s(value: Any, field: str) -> float | None:
    """A lane's ``backoffBaseS`` or ``backoffCapS``: seconds, 0..7 days."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{field} must be a number of seconds from 0 to {BACKOFF_S_MAX:.0f}",
                           field=field)
    out: float = _check(types(DEFAULT_LIMITS).backoff_s, float(value), InvalidInput, field,
                        f"{field} must be a number of seconds from 0 to {BACKOFF_S_MAX:.0f}")
    return out


def task_status(value: Any) -> str | None:
    if value is None:
        return None
    if value not in TASK_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(TASK_STATUSES)}", field="status")
    return str(value)


def task_kind(value: Any) -> str | None:
    if value is None:
        return None
    if value not in TASK_KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(TASK_KINDS)}", field="kind")
    return str(value)


def list_limit(value: Any) -> int:
    if value is None:
        return 50
    out: int = _check(types(DEFAULT_LIMITS).list_limit, value, InvalidInput, "limit",
                      f"limit must be an integer from 1 to {LIST_LIMIT_MAX}")
    return out
