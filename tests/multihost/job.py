"""The command the multihost lane workers run per task (``autonomy worker -- python job.py``).

It answers ``{"host": <the worker's host>, "taskId": N}`` so the recorded result names who
did the task. A task whose payload says ``{"holdOn": HOST, "gate": PATH}`` is held on that
host: the command writes ``PATH.started``, waits until ``PATH`` exists, then writes
``PATH.finished`` and answers. On any other host it answers at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HOLD_AT_MOST_S = 180.0


def main() -> int:
    task = json.load(sys.stdin)
    payload = task.get("payload") or {}
    host = os.environ.get("MH_HOST", "?")
    gate = payload.get("gate")
    if gate and payload.get("holdOn") == host:
        Path(gate + ".started").touch()
        deadline = time.monotonic() + HOLD_AT_MOST_S
        while not Path(gate).exists():
            if time.monotonic() > deadline:
                print(f"gate {gate} never opened", file=sys.stderr)
                return 1
            time.sleep(0.05)
        Path(gate + ".finished").touch()
    print(json.dumps({"host": host, "taskId": task["id"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
