"""A complete agent: works the ``reviewer`` lane of an autonomy server until Ctrl-C.

    AUTONOMY_URL=http://127.0.0.1:8000 AUTONOMY_API_TOKEN=... python examples/agent.py

Create work with ``autonomy create reviewer "Review the retry" --payload '{"tests": []}'``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from autonomy_client import Client, LaneWorker, ValidationFailed


def review(task: dict[str, Any]) -> dict[str, Any]:
    """Approve a change that comes with tests; fail it (a breaker-counted reason) otherwise."""
    payload = task.get("payload") or {}
    if not payload.get("tests"):
        raise ValidationFailed("review rejected: the change has no tests")
    return {"approved": True, "tests": payload["tests"]}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    url = os.environ.get("AUTONOMY_URL", "http://127.0.0.1:8000")
    lane = os.environ.get("AUTONOMY_LANE", "reviewer")
    max_tasks = int(os.environ["AUTONOMY_MAX_TASKS"]) if "AUTONOMY_MAX_TASKS" in os.environ \
        else None
    with Client(url, os.environ.get("AUTONOMY_API_TOKEN")) as client:
        stats = LaneWorker(lane, review, client=client).run(max_tasks=max_tasks)
    print(json.dumps(stats.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
