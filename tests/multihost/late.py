"""Send a late complete from a cut-off host, the way its worker would: the same client
(``LocalClient`` straight to PostgreSQL/Redis, or ``HttpClient`` with ``--url``), the
worker's lease token, a result naming the host. Prints the answer as one JSON line:
``{"ok": true, ...}`` or ``{"ok": false, "error": code}``.

    python late.py TASK_ID LEASE_TOKEN [--url URL --token TOKEN]
"""

from __future__ import annotations

import json
import os
import sys

from app.errors import AutonomyError
from app.workers.client import Client, HttpClient, LocalClient


def main(argv: list[str]) -> int:
    task_id, lease_token, rest = int(argv[0]), argv[1], argv[2:]
    client: Client
    if rest[:1] == ["--url"]:
        client = HttpClient(rest[1], rest[3] if rest[2:3] == ["--token"] else None)
    else:
        client = LocalClient()
    host = os.environ.get("MH_HOST", "?")
    try:
        answer = client.complete(task_id, lease_token, outcome="success",
                                 result={"host": host, "taskId": task_id, "late": True})
    except AutonomyError as e:
        answer = {"ok": False, "error": e.code}
    finally:
        client.close()
    print(json.dumps(answer, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
