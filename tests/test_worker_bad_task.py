"""A worker outlives a bad task (SPEC 4.8): ``autonomy worker --url`` (a real process) on a
lane whose server cannot answer for some tasks -- a claim granted and then answered 500
(what a poison task did), a grant answered with a body that is not JSON (here the
``next`` of a complete with ``claimNext``: the whole complete answer is lost), a complete
answered 500, and a command that crashes. Each is logged with its task id, the task ends
its attempt as a failure with a clear reason (or is claimed again when the answer that
was lost granted it), and the worker goes on to do the next task. The faults strike each
task's first attempt only, so the retry (SPEC 4.2: a failure returns the task to ``todo``)
succeeds and the breaker is not what moves the lane along.

The faults are injected by an ASGI wrapper around the real app, in the real server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.ops import lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests.api_server import ServerThread
from tests.conftest import make_settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# CMD: crash on the first attempt of the task titled "crash", else succeed
CMD = ["sh", "-c", 'if [ "$AUTONOMY_TASK_TITLE" = crash ] && [ "$AUTONOMY_TASK_ATTEMPTS" = 0 ]; '
       'then kill -SEGV $$; fi; echo \'{"done": true}\'']


class Faults:
    """Wraps the app: answers what a broken server would for the marked tasks."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.faulted: list[str] = []
        self.broken_complete: set[int] = set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/autonomy":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            m = await receive()
            chunks.append(m.get("body", b""))
            if not m.get("more_body"):
                break
        raw = b"".join(chunks)
        request = json.loads(raw)
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        if request.get("action") == "complete" and request.get("outcome") == "success" \
                and request.get("taskId") in self.broken_complete:
            self.broken_complete.discard(request["taskId"])
            self.faulted.append(f"complete {request['taskId']}: 500")
            await _send(send, 500, b'{"ok": false, "error": "internal_error", '
                                   b'"message": "unexpected server error"}')
            return
        messages: list[Any] = []

        async def keep(m: Any) -> None:
            messages.append(m)

        await self.app(scope, replay, keep)  # the real answer, committed
        body = b"".join(m.get("body", b"") for m in messages
                        if m["type"] == "http.response.body")
        answer = json.loads(body)
        # a grant comes in a claim's answer, or in a complete's ``next`` (claimNext)
        grant = answer if request.get("action") == "claim" else answer.get("next")
        if isinstance(grant, dict):
            title = (grant.get("task") or {}).get("title")
            if title == "claim-500" and f"claim {title}" not in self.faulted:
                self.faulted.append(f"claim {title}")
                await _send(send, 500, b"Internal Server Error", ctype=b"text/plain")
                return
            if title == "claim-garbled" and f"claim {title}" not in self.faulted:
                self.faulted.append(f"claim {title}")
                await _send(send, 200, b'{"ok": true, "task": {"id": ')
                return
        for m in messages:
            await send(m)

    broken_complete: set[int]


async def _send(send: Any, status: int, body: bytes, ctype: bytes = b"application/json"
                ) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def wctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix))
    yield ctx
    ctx.close()


def _task(ctx: Context, tid: int) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=tid)
    assert row is not None
    return dict(row)


def test_a_worker_outlives_tasks_the_server_cannot_answer_for(wctx: Context,
                                                             tmp_path: Path) -> None:
    from app.api.app import create_app

    ids = {}
    for prio, title in enumerate(["normal", "crash", "complete-500", "claim-garbled",
                                  "claim-500"]):
        ids[title] = lanes.create(wctx, assignee="lane", title=title,
                                  priority=prio)["task"]["id"]
    faults = Faults(create_app(ctx=wctx))
    faults.broken_complete = {ids["complete-500"]}
    server = ServerThread(faults).start()  # type: ignore[arg-type]
    err_path = tmp_path / "worker.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
    try:
        with err_path.open("wb") as err:
            proc = subprocess.run(
                [sys.executable, "-m", "app.cli", "worker", "--lane", "lane", "--name", "w1",
                 "--url", server.url, "--json", "--max-tasks", "7", "--idle-max", "0.2",
                 "--pause-max", "0.3", "--", *CMD],
                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=err, timeout=120)
    finally:
        server.stop()
    log = err_path.read_text()
    print(log)
    assert proc.returncode == 0, log
    summary = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert summary["succeeded"] == 5 and summary["failed"] == 2, summary
    assert sorted(faults.faulted) == sorted([
        "claim claim-500", "claim claim-garbled", f"complete {ids['complete-500']}: 500"])
    # claim-500 (the lane's first task) came in a claim's answer: the worker claimed
    # again; claim-garbled came as ``next`` in claim-500's complete answer: the worker
    # completed again, heard that the first complete was recorded, and took the lease
    # that answer handed it
    assert log.count("claiming again (backoff") == 1, log
    assert f"task {ids['claim-500']}: done (an earlier complete was recorded" in log, log

    # the claims whose answers were lost: claimed again (the same lease), done at once
    for title in ("claim-500", "claim-garbled"):
        t = _task(wctx, ids[title])
        assert t["status"] == "done" and t["attempts"] == 0, t
        assert t["result"] == {"done": True}, t
    # the task whose success could not be recorded, and the command that crashed: that
    # attempt failed with a clear reason, logged with the task id; the retry succeeded
    for title, why in (("complete-500", "the server could not record the outcome "
                                        "(success): internal_error"),
                       ("crash", "killed by signal SIGSEGV")):
        t = _task(wctx, ids[title])
        assert t["status"] == "done" and t["attempts"] == 1, t
        assert t["last_validation_reason"] == why, t
        assert f"task {ids[title]}: failed ({why})" in log
    assert f"task {ids['complete-500']}: complete answered internal_error" in log
    # and the lane's last task was done after all of them
    t = _task(wctx, ids["normal"])
    assert t["status"] == "done" and t["result"] == {"done": True}, t
