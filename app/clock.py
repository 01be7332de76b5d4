"""The clock the code asks for the time, so time rules are tested without sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Timezone-aware UTC now: this process's wall clock (``time.time``), which may be
    off -- what it decides is this process's own business only (log lines, its waits);
    the time rules are the database's (SPEC 4.9, ``Context.now_in``). Read through
    ``time.time`` so that a test can shift one process's clock (``tests/skew.py``)."""
    return datetime.fromtimestamp(time.time(), UTC)


def to_ms(dt: datetime) -> int:
    """Epoch milliseconds of an aware datetime."""
    return int(dt.timestamp() * 1000)


def from_ms(ms: int | float) -> datetime:
    """Aware UTC datetime from epoch milliseconds."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 with a Z, or None."""
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso_ms(ms: object) -> str | None:
    """ISO-8601 of epoch milliseconds as persisted in check state; None for anything that
    is not an integer."""
    if isinstance(ms, bool) or not isinstance(ms, int):
        return None
    return iso(from_ms(ms))


class FrozenClock:
    """A clock for tests: stands still until told to move."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now = self.now + timedelta(**kwargs)
        return self.now
