"""Capped exponential backoff with jitter, for loops that wait on something outside."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with a little jitter, so workers do not poll in step."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s, self.max_s = first_s, max(first_s, max_s)
        self.next_s = first_s

    def step(self) -> float:
        """The next wait, and double the one after."""
        wait = self.next_s
        self.next_s = min(self.max_s, self.next_s * 2)
        return wait * random.uniform(0.85, 1.0)

    def reset(self) -> None:
        """Start again from the first wait (the thing waited for came back)."""
        self.next_s = self.first_s
