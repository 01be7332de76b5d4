"""A periodic job's message is good for one period, on Redis's clock (SPEC 4.9).

Celery's own ``expires`` turns the period into a moment on the beat host's clock, and the
worker compares that moment with its own clock: a beat host a period behind the workers
had every message dropped as expired (no check ran at all), one ahead sent messages that
outlived their period. So beat sends no ``expires``: it stamps each message with Redis's
now (``autonomy_sent_ms``) beside the job's period (``autonomy_period_ms``, from the
schedule), and the task compares Redis's now when it starts. A message older than its
period -- it waited in the queue while the workers were down, say -- is skipped
(``skipped: "expired"``), as Celery's expiry would have skipped it, and no host's clock
takes part in the decision. A message without the stamp (``celery call`` by hand) runs.
"""

from __future__ import annotations

from typing import Any

import redis

from app.clock import iso_ms
from app.storage.context import Context
from app.storage.redis_scripts import time_ms

SENT = "autonomy_sent_ms"
PERIOD = "autonomy_period_ms"


def redis_now_ms(ctx: Context) -> int:
    """Redis's now in epoch ms (one ``TIME``), or a test's pinned clock."""
    return time_ms(ctx, ctx.redis.time())


def period_header(every_s: float) -> dict[str, int]:
    """The schedule's static header: the job's period."""
    return {PERIOD: int(every_s * 1000)}


def stamp(ctx: Context, headers: dict[str, Any] | None) -> dict[str, Any]:
    """``headers`` with Redis's now as the send time (raises a Redis error if unreadable:
    beat then skips this period, as it does when its lease is not confirmed)."""
    return {**(headers or {}), SENT: redis_now_ms(ctx)}


def overdue(ctx: Context, sent_ms: Any, period_ms: Any) -> dict[str, Any] | None:
    """When the message has outlived its period on Redis's clock: when it was sent, when
    it expired and Redis's now; None when it is still good, carries no stamp, or Redis
    cannot say (the run then goes on to its run-lock, which needs Redis anyway)."""
    if not isinstance(sent_ms, int) or not isinstance(period_ms, int):
        return None
    try:
        now = redis_now_ms(ctx)
    except redis.RedisError:
        return None
    if now <= sent_ms + period_ms:
        return None
    return {"sentAt": iso_ms(sent_ms), "expiredAt": iso_ms(sent_ms + period_ms),
            "redisNow": iso_ms(now)}
