"""Push pickup and delayed tasks (SPEC 4.11): a waiting claim is woken when a task falls
due -- its wait is bounded by the lane's next due time -- long before the safety poll
(set to a minute here), and one waiter per due instant claims it. Real clock, SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.ops import lane_control, lanes
from app.storage.context import Context
from tests.conftest import make_settings

LANE = "due"


@pytest.fixture
def pair(database_url: str, redis_server_url: str, redis_prefix: str
         ) -> Iterator[tuple[Context, Context]]:
    s = make_settings(database_url, redis_server_url, redis_prefix,
                      pickup_safety_poll_ms=60_000, backoff_jitter=0)
    waiter, producer = Context.from_settings(s), Context.from_settings(s)
    lane_control.configure_lane(producer, assignee=LANE, max_in_flight=8, actor="t")
    try:
        yield waiter, producer
    finally:
        waiter.close()
        producer.close()


def _claim_in_thread(ctx: Context, worker: str, wait_ms: int
                     ) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        box["answer"] = lanes.claim(ctx, assignee=LANE, worker=worker, wait_ms=wait_ms)
        box["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_a_waiting_claim_takes_a_delayed_task_when_it_falls_due(
        pair: tuple[Context, Context]) -> None:
    waiter, producer = pair
    waiter.redis.set(waiter.keys.lane_poll(LANE), "1", px=60_000)  # no safety poll here
    t, box = _claim_in_thread(waiter, "w1", 15_000)
    made_at = time.monotonic()
    task = lanes.create(producer, assignee=LANE, title="later", delay_s=1.0)["task"]
    t.join(20)
    answer = box["answer"]
    assert answer["task"] is not None and answer["task"]["id"] == task["id"], answer
    waited = box["at"] - made_at
    assert 0.9 <= waited < 10, waited  # at its due time, not at a safety poll (60 s)


def test_a_failed_tasks_backoff_ends_with_a_waiter_claiming_it(
        pair: tuple[Context, Context]) -> None:
    waiter, producer = pair
    lane_control.configure_lane(producer, assignee=LANE, backoff_base_s=1.0, actor="t")
    tid = lanes.create(producer, assignee=LANE, title="flaky")["task"]["id"]
    c = lanes.claim(producer, assignee=LANE, worker="w0")
    waiter.redis.set(waiter.keys.lane_poll(LANE), "1", px=60_000)
    t, box = _claim_in_thread(waiter, "w1", 15_000)
    failed_at = time.monotonic()
    lanes.complete(producer, task_id=tid, lease_token=c["lease"]["token"], outcome="failure",
                   validation_reason="flaky")
    t.join(20)
    assert box["answer"]["task"]["id"] == tid, box
    assert 0.9 <= box["at"] - failed_at < 10


@pytest.mark.slow
def test_one_waiter_per_due_instant_claims_and_the_others_keep_waiting(
        pair: tuple[Context, Context], database_url: str, redis_server_url: str,
        redis_prefix: str) -> None:
    waiter, producer = pair
    s = make_settings(database_url, redis_server_url, redis_prefix,
                      pickup_safety_poll_ms=60_000)
    others = [Context.from_settings(s) for _ in range(3)]
    try:
        waiter.redis.set(waiter.keys.lane_poll(LANE), "1", px=60_000)
        runs = [_claim_in_thread(c, f"w{i}", 4_000) for i, c in enumerate([waiter, *others])]
        task = lanes.create(producer, assignee=LANE, title="later", delay_s=0.5)["task"]
        for t, _ in runs:
            t.join(20)
        got = [box["answer"] for _, box in runs]
        winners = [a for a in got if a["task"] is not None]
        assert [a["task"]["id"] for a in winners] == [task["id"]], got
    finally:
        for c in others:
            c.close()
