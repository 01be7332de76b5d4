"""The first-run demo behind ``autonomy up --demo``: a few lanes, some tasks, and three real
``autonomy worker`` processes — one healthy, one that fails the same validation every time,
one that fails with a different reason every time.

A newcomer watches the ``coder`` lane drain, and the ``reviewer`` lane trip the failure
breaker within its first minute: the lane pauses (amber badge), an ``ops_remediation``
task appears in the ``ops`` lane, and the Resume button lets the reviewer go on (and trip
again, since its command never gets fixed). The ``deployer`` lane's one task fails with
words that differ each time, so no fingerprint repeats and the breaker never trips; after
its lane's ``max_attempts`` (3, with a backoff of 1 s then 2 s) it ends ``dead`` with its
last reason (SPEC 4.11), shown in the panel's task list (status ``dead``, a Requeue
button) and by ``autonomy tasks --status dead``; ``autonomy requeue ID`` sends it round
again.
"""

from __future__ import annotations

import sys
from typing import Any

from app.ops import history, lane_control, lanes
from app.settings import Settings
from app.storage.context import Context

HEALTHY_LANE = "coder"
FAILING_LANE = "reviewer"
DEMO_ACTOR = "demo"
FAILURE_REASON = "review rejected: the change has no tests"
DEAD_LANE = "deployer"
DEAD_MAX_ATTEMPTS = 3
DEAD_BACKOFF_BASE_S, DEAD_BACKOFF_CAP_S = 1.0, 2.0
DEAD_TASK = "Deploy: rotate the staging certificates"
# one reason per attempt, each its own fingerprint: what an agent's free-text answer does
DEAD_REASONS = [
    "deploy failed: the staging cluster refused the new certificate chain",
    "deploy failed: could not reach the secrets vault (connection reset by peer)",
    "deploy failed: the health check never turned green after the rollout",
]

CODER_TASKS = [
    "Add retry to the payment webhook", "Fix flaky login test", "Paginate the audit log",
    "Rename settings module", "Cache the pricing table", "Bump the HTTP client",
    "Split the orders service", "Add health endpoint", "Document the export API",
    "Remove dead feature flags", "Speed up the nightly report", "Tidy CI config",
]
REVIEWER_TASKS = [
    "Review: payment webhook retry", "Review: login test fix", "Review: audit log paging",
    "Review: pricing cache", "Review: orders split", "Review: health endpoint",
    "Review: export API docs", "Review: feature flag cleanup",
]

# CMD for the healthy worker: read the task, think a little, answer a JSON result
_HEALTHY = (
    "import json, random, sys, time; task = json.load(sys.stdin); "
    "time.sleep(random.uniform(0.5, 1.5)); "
    "print(json.dumps({'summary': 'done: ' + task['title'], 'linesChanged': "
    "random.randint(3, 120)}))"
)
# CMD for the dead-ending worker: a different reason each attempt -> no fingerprint repeats,
# the breaker never trips, and max_attempts ends the task as dead
_DEAD_ENDING = (
    "import json, sys, time; task = json.load(sys.stdin); time.sleep(0.3); "
    f"reasons = {DEAD_REASONS!r}; "
    "print(reasons[task['attempts'] % len(reasons)], file=sys.stderr); sys.exit(1)"
)
# CMD for the failing worker: the same validation failure every time -> the breaker trips
_FAILING = (
    "import sys, time; sys.stdin.read(); time.sleep(0.5); "
    f"print('looking at the diff...', file=sys.stderr); print({FAILURE_REASON!r}, "
    "file=sys.stderr); sys.exit(1)"
)


def seed(ctx: Context) -> dict[str, Any]:
    """Resume the demo lanes (so every demo run shows the whole story), give the
    ``deployer`` lane its small ``max_attempts``, and queue tasks in them, topping each up
    to its demo size. Safe to call on every start."""
    created: dict[str, int] = {}
    lane_control.configure_lane(ctx, assignee=DEAD_LANE, actor=DEMO_ACTOR,
                                max_attempts=DEAD_MAX_ATTEMPTS,
                                backoff_base_s=DEAD_BACKOFF_BASE_S,
                                backoff_cap_s=DEAD_BACKOFF_CAP_S)
    for lane, titles in ((HEALTHY_LANE, CODER_TASKS), (FAILING_LANE, REVIEWER_TASKS),
                         (DEAD_LANE, [DEAD_TASK])):
        lane_control.resume_lane(ctx, assignee=lane, actor=DEMO_ACTOR,
                                 reason="demo start")
        waiting = len(history.recent_tasks(ctx, assignee=lane, status="todo",
                                           limit=len(titles)))
        created[lane] = 0
        for i, title in enumerate(titles[waiting:]):
            lanes.create(ctx, assignee=lane, title=title, priority=0,
                         payload={"demo": True, "n": waiting + i + 1}, actor=DEMO_ACTOR)
            created[lane] += 1
    return {"ok": True, "lanes": [HEALTHY_LANE, FAILING_LANE, DEAD_LANE],
            "created": created, "failureReason": FAILURE_REASON}


def worker_commands(settings: Settings) -> list[list[str]]:
    """The demo workers' argv lists, to run with the same environment as ``up`` (they reach
    the same database and Redis through it). Short poll and pause waits, so that the demo
    reacts quickly to a resume."""
    base = [sys.executable, "-m", "app.cli", "worker", "--idle-max", "1", "--pause-max", "3",
            "--grace", "5", "--timeout", str(max(10.0, min(60.0, settings.lease_ttl_s)))]
    return [
        [*base, "--lane", HEALTHY_LANE, "--name", "demo-coder", "--",
         sys.executable, "-c", _HEALTHY],
        [*base, "--lane", FAILING_LANE, "--name", "demo-reviewer", "--",
         sys.executable, "-c", _FAILING],
        [*base, "--lane", DEAD_LANE, "--name", "demo-deployer", "--",
         sys.executable, "-c", _DEAD_ENDING],
    ]
