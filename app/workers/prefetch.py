"""``prefetch="auto"`` (issue 22): how many leases a worker claims at once, from how long
its handler takes.

A prefetched lease waits its turn behind the ones claimed before it, so K is chosen to
keep that wait short: as many tasks as the handler runs in ``AUTO_WAIT_S`` (the mean of
the recent ones), at least 1 and at most ``AUTO_MAX``. A worker starts at 1 (nothing
measured yet), so slow tasks are never prefetched and a fleet of short ones pays one
commit per K tasks instead of per task.
"""

from __future__ import annotations

from typing import Any, Literal

from app.errors import InvalidInput
from app.validate import CLAIM_MAX_MAX

AUTO: Literal["auto"] = "auto"
AUTO_MAX = 10  # pgqueuer's default batch size
AUTO_WAIT_S = 0.05  # the longest a prefetched lease should wait for its turn
_WEIGHT = 0.2  # of the newest task in the mean


def prefetch_setting(value: Any) -> int | Literal["auto"]:
    """A worker's ``prefetch``: ``"auto"``, or K, an integer from 1 to the claim's
    ``max`` limit (a digit string, as the CLI passes it, too)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= CLAIM_MAX_MAX:
        raise InvalidInput(f"prefetch must be {AUTO!r} or an integer from 1 to "
                           f"{CLAIM_MAX_MAX}, not {value!r}", field="prefetch")
    return value


class AutoPrefetch:
    """K for the next claim, from the handler's recent run times."""

    def __init__(self, cap: int = AUTO_MAX, wait_s: float = AUTO_WAIT_S) -> None:
        self.cap = cap
        self.wait_s = wait_s
        self.mean_s: float | None = None

    def observe(self, seconds: float) -> None:
        """One task's handler time."""
        seconds = max(0.0, seconds)
        self.mean_s = seconds if self.mean_s is None \
            else (1 - _WEIGHT) * self.mean_s + _WEIGHT * seconds

    def k(self) -> int:
        """Leases to claim at once: the last of K waits (K - 1) tasks, about ``wait_s``."""
        if self.mean_s is None:
            return 1
        if self.mean_s <= 0:
            return self.cap
        return max(1, min(self.cap, 1 + int(self.wait_s / self.mean_s)))
