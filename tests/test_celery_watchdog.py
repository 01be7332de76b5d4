"""The Celery worker's consumer watchdog (``app.celery_watchdog``): its reasoning on an
injected clock, then a real worker whose consumer takes nothing while messages wait --
it stops with exit code 70, and the worker started in its place runs what waited."""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import pytest
import redis

from app.celery_watchdog import EXIT_STUCK, Watch
from tests.test_celery_e2e import DEADLINE_S, _stored_results, _wait_for, control_diagnosis, e2e

__all__ = ["e2e"]  # the fixture


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _watch(stuck_after_s: float = 60.0) -> tuple[Watch, Clock]:
    clock = Clock()
    return Watch(stuck_after_s=stuck_after_s, clock=clock), clock


def test_messages_waiting_with_none_taken_for_the_window_is_stuck() -> None:
    w, clock = _watch()
    answers = []
    for _ in range(6):  # a check every 15 s, messages waiting throughout, none taken
        clock.now += 15
        answers.append(w.check(waiting=3, pool_full=False))
    assert answers[:5] == [None] * 5  # the first check that saw them starts the count
    assert answers[5] is not None and "3 message(s) have waited in the queue for 60 s" \
        in answers[5]


def test_a_message_taken_in_between_starts_the_count_again() -> None:
    w, clock = _watch()
    for i in range(12):
        clock.now += 15
        if i % 3 == 2:
            w.taken()  # the worker is slow but takes messages: never stuck
        assert w.check(waiting=5, pool_full=False) is None


def test_a_busy_pool_an_empty_queue_or_a_broker_that_cannot_say_is_not_stuck() -> None:
    for waiting, pool_full in ((4, True), (0, False), (None, False)):
        w, clock = _watch()
        for _ in range(10):
            clock.now += 15
            assert w.check(waiting=waiting, pool_full=pool_full) is None


def test_a_message_arriving_after_a_long_idle_spell_is_not_stuck_at_once() -> None:
    w, clock = _watch()
    clock.now += 3600  # an hour with nothing to do
    assert w.check(waiting=0, pool_full=False) is None
    clock.now += 15
    assert w.check(waiting=1, pool_full=False) is None  # just arrived
    clock.now += 15
    assert w.check(waiting=1, pool_full=False) is None  # waited 15 s of 60


@pytest.mark.slow
def test_a_worker_whose_consumer_takes_nothing_stops_and_its_replacement_runs_the_backlog(
        e2e: dict[str, Any]) -> None:
    """The consumer is cancelled by hand (the way to make a live worker take nothing on
    purpose; the kombu bug after a Redis restart looks the same from outside)."""
    e2e["env"]["AUTONOMY_CELERY_WATCHDOG_S"] = "2"
    client = e2e["client"]
    queue = e2e["env"]["AUTONOMY_CELERY_QUEUE"]
    node = f"wd-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    argv = ("worker", "--loglevel", "INFO", "--concurrency", "2", "-n", node,
            "--without-mingle", "--without-gossip")
    stuck = e2e["start"]("stuck", *argv)
    deadline = time.monotonic() + DEADLINE_S
    _wait_for("the worker to answer ping",
              lambda: client.control.ping(destination=[node], timeout=0.5), [stuck], deadline,
              lambda: control_diagnosis(e2e["redis_url"], e2e["prefix"], [stuck]))
    answer = client.control.cancel_consumer(queue, destination=[node], reply=True, timeout=5)
    assert answer and "ok" in next(iter(answer[0].values()))
    sent = [client.send_task("tasks.checks.status", queue=queue).id for _ in range(3)]

    while stuck.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stuck.popen.returncode == EXIT_STUCK, stuck.output()
    log = stuck.output()
    assert "consumer watchdog: queue" in log and "its consumer is stuck" in log
    assert "3 message(s) have waited in the queue" in log

    fresh = e2e["start"]("fresh", *argv)
    r = redis.Redis.from_url(e2e["redis_url"], decode_responses=True)

    def ran() -> bool:
        done = {m["task_id"] for m in _stored_results(r, e2e["prefix"])
                if m.get("status") == "SUCCESS"}
        return set(sent) <= done

    _wait_for("the fresh worker to run the three waiting jobs", ran, [fresh],
              time.monotonic() + DEADLINE_S)
    r.close()
