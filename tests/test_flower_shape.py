"""What Flower shows of the run-locks, without a browser: the status task's result renders
in full through Celery's own ``saferepr`` (the repr Flower gets in the task-succeeded
event), and the worker's stats carry the same run-locks and beat lease as the status
payload and ``inspect run_locks``, with one readable line per lock."""

from __future__ import annotations

from celery.utils.saferepr import saferepr

from app.celery_app import lock_lines
from app.ops import lanes
from app.ops.checks.jobs import run_job
from app.ops.checks.status import build_status
from app.ops.run_locks import view as locks_view
from app.storage import leader, locks
from app.storage.context import Context
from tasks.checks import STATUS_REPR_MAX, TASKS, flower_shape, payload_of


def test_the_status_result_renders_in_full_in_flower_and_loses_nothing(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="one")
    run_job(ctx, "handoff_health")  # criteria with counters: nested four levels deep
    held = locks.acquire(ctx, "readiness", budget_ms=30_000, holder="h:1:held")
    over = locks.acquire(ctx, "self_heal", budget_ms=1, holder="h:2:over")
    leader.acquire(ctx, "h:3:beat")
    leader.stand_by(ctx, "h:4:beat")
    assert held and over
    ctx.clock.advance(seconds=1)  # type: ignore[attr-defined]
    payload = run_job(ctx, "status")
    shaped = flower_shape(payload)
    text = saferepr(shaped, TASKS["status"].resultrepr_maxsize)
    assert "{...}" not in text and "[...]" not in text and not text.endswith("...}")
    assert TASKS["status"].resultrepr_maxsize == STATUS_REPR_MAX
    # the run-locks and the beat lease come first, each entry complete
    assert list(shaped)[:2] == ["workflowHealth.runLocks", "beat"]
    assert text.startswith("{'workflowHealth.runLocks': [{'job': 'readiness', "
                           "'holder': 'h:1:held', ")
    for lk in payload["workflowHealth"]["runLocks"]:
        assert saferepr(lk) in text
    assert "'overBudget': True" in text and "'holderAlive': True" in text
    assert "'leader': 'h:3:beat'" in text and "'standbys': ['h:4:beat']" in text
    # nothing is dropped or changed: the lifted parts go back to the payload
    assert payload_of(shaped) == payload
    # the unshaped payload is what Flower used to elide
    assert "[{...}" in saferepr(payload, STATUS_REPR_MAX)


def test_the_worker_stats_lines_show_every_lock_with_elapsed_budget_and_the_beat_lease(
        ctx: Context) -> None:
    locks.acquire(ctx, "readiness", budget_ms=30_000, holder="h:1:held")
    locks.acquire(ctx, "self_heal", budget_ms=1, holder="h:2:over")
    ctx.clock.advance(seconds=2.5)  # type: ignore[attr-defined]
    leader.acquire(ctx, "h:3:beat")
    answer = locks_view(ctx)
    assert answer["runLocks"] == build_status(ctx)["workflowHealth"]["runLocks"]
    lines = lock_lines(answer)
    assert lines["run-lock readiness"].startswith(
        "holder h:1:held · elapsed 2.5 s of 30.0 s budget · within budget · holder alive")
    assert "elapsed 2.5 s of 0.0 s budget · OVER BUDGET" in lines["run-lock self_heal"]
    assert lines["beat leader lease"].startswith("h:3:beat · since ")
    assert "TTL 10.0 s" in lines["beat leader lease"]
