"""Input checks shared by every adapter: each failure is a named ``InvalidInput``."""

from __future__ import annotations

import json
import re
from typing import Any

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

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_WORKER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/\-]*$")
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
MAX_PRIORITY = 1_000_000


def assignee(value: Any, s: Settings) -> str:
    """A lane name: 1..assignee_max_len of letters, digits, ``_.-``."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidAssignee("assignee must be a non-empty string")
    v = value.strip()
    if len(v) > s.assignee_max_len:
        raise InvalidAssignee(f"assignee is longer than {s.assignee_max_len} characters")
    if not _NAME.match(v):
        raise InvalidAssignee("assignee may hold only letters, digits and _ . -")
    return v


def worker(value: Any, s: Settings) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidWorker("worker must be a non-empty string")
    v = value.strip()
    if len(v) > s.worker_max_len:
        raise InvalidWorker(f"worker is longer than {s.worker_max_len} characters")
    if not _WORKER.match(v):
        raise InvalidWorker("worker may hold only letters, digits and _ . - : @ /")
    return v


def title(value: Any, s: Settings) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidTitle("title must be a non-empty string")
    v = value.strip()
    if len(v) > s.title_max_len:
        raise InvalidTitle(f"title is longer than {s.title_max_len} characters")
    return v


def priority(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("priority must be an integer")
    if abs(value) > MAX_PRIORITY:
        raise InvalidInput(f"priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
    return value


def json_object(value: Any, s: Settings, *, field: str = "payload",
                optional: bool = True) -> dict[str, Any] | None:
    """A JSON object (a dict, or a string holding one) within ``payload_max_bytes``."""
    if value is None:
        if optional:
            return None
        raise InvalidPayload(f"{field} is required")
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidPayload(f"{field} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise InvalidPayload(f"{field} must be a JSON object")
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidPayload(f"{field} is not serialisable as JSON: {e}") from e
    if size > s.payload_max_bytes:
        raise InvalidPayload(f"{field} is {size} bytes, over {s.payload_max_bytes}")
    return value


def task_id(value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidInput("taskId must be an integer")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < 1 or value > 2**62:
        raise InvalidInput("taskId must be a positive integer")
    return value


def lease_token(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise InvalidLeaseToken("leaseToken must be the 32-hex token the claim answered")
    return value


def outcome(value: Any) -> Outcome:
    try:
        return Outcome(value)
    except (ValueError, TypeError):
        raise InvalidOutcome("outcome must be 'success' or 'failure'") from None


def reason(value: Any, s: Settings, *, required: bool, field: str = "validationReason"
           ) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidReason(f"{field} is required for a failure")
        return None
    if not isinstance(value, str):
        raise InvalidReason(f"{field} must be a string")
    if len(value) > s.reason_max_len:
        raise InvalidReason(f"{field} is longer than {s.reason_max_len} characters")
    return value.strip()


def incident_status(value: Any) -> IncidentStatus:
    try:
        st = IncidentStatus(value)
    except (ValueError, TypeError):
        st = None
    if st is None or st is IncidentStatus.recovering:
        raise InvalidInput("status must be 'ok', 'warning' or 'critical'")
    return st


def positive_number(value: Any, field: str, *, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= maximum:
        raise InvalidInput(f"{field} must be a number in (0, {maximum}]")
    return float(value)
