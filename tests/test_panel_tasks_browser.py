"""The panel's task list in a real browser (issue 21 item 7, SPEC 4.11): filtered by status
(dead tasks visible) and by lane (a lane's name in the lane table), and a dead task's
Requeue button -- clicked by an operator signed in with a named credential -- brings the
task back to ``todo`` with its attempts reset, as a ``task_requeued`` event whose actor is
that credential (the panel's own ``actor`` kept as the note). Playwright driving Debian's
chromium, the harness of ``tests/test_panel_browser.py``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from app.ops import credentials, lane_control, lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests import test_panel_browser as harness
from tests.api_server import ServerThread
from tests.test_panel_browser import OUTPUT, WAIT_MS, sign_in

# the harness's fixtures: the browser, the signed-out page, the server and its context
browser, page, panel_ctx, server = harness.browser, harness.page, harness.panel_ctx, \
    harness.server

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _fail(ctx: Context, lane: str, reason: str) -> int:
    """Claim the lane's next task and fail it (its lane's max_attempts is 1: dead)."""
    got = lanes.claim(ctx, assignee=lane, worker=f"{lane}-1")
    lanes.complete(ctx, task_id=got["task"]["id"], lease_token=got["lease"]["token"],
                   outcome="failure", validation_reason=reason)
    return int(got["task"]["id"])


def _task(ctx: Context, tid: int) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=tid)
        events = [dict(e) for e in store.list_events(conn, task_id=tid)]
    assert row is not None
    return {**dict(row), "events": events}


def test_the_task_list_filters_by_status_and_lane_and_requeues_a_dead_task(
        server: ServerThread, panel_ctx: Context, page: Page) -> None:
    ctx = panel_ctx
    for lane in ("deployer", "coder"):
        lane_control.configure_lane(ctx, assignee=lane, max_attempts=1, actor="test")
    lanes.create(ctx, assignee="deployer", title="Rotate the staging certificates")
    dead = _fail(ctx, "deployer", "the vault refused the new chain")
    waiting = lanes.create(ctx, assignee="deployer", title="Deploy the API")["task"]["id"]
    lanes.create(ctx, assignee="coder", title="Fix the flaky test")
    other_dead = _fail(ctx, "coder", "tests failed")
    lanes.create(ctx, assignee="coder", title="Paginate the audit log")
    secret = credentials.create(ctx, name="ops-alice", scope="operator")["secret"]
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    sign_in(page, server, secret)
    rows = page.locator("#tasks tr[data-task]")
    expect(rows).to_have_count(4)  # newest first, every lane and status

    # status: dead -- both dead tasks, from both lanes, each with its Requeue button
    page.locator("#tasks a[data-filter='dead']").click()
    expect(page).to_have_url(server.url + "/?status=dead", timeout=WAIT_MS)
    expect(rows).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator(f"#tasks tr[data-task='{other_dead}']")).to_be_visible()
    for tid in (dead, other_dead):
        expect(page.locator(f"#tasks tr[data-task='{tid}'] button.requeue")).to_be_visible()
    expect(page.locator("#tasks a[data-filter='dead']")).to_have_class("on")

    # lane: the deployer's name in the lane table narrows the list, the status kept
    page.locator("#lanes a[data-filter-lane='deployer']").click()
    expect(page).to_have_url(server.url + "/?assignee=deployer&status=dead", timeout=WAIT_MS)
    expect(rows).to_have_count(1, timeout=WAIT_MS)
    row = page.locator(f"#tasks tr[data-task='{dead}']")
    expect(row).to_have_attribute("data-lane", "deployer")
    expect(row.locator(".st")).to_have_text("dead")
    expect(row.locator(".why")).to_have_text("the vault refused the new chain")
    expect(row.locator("td.num").nth(1)).to_have_text("1")  # failures
    expect(page.locator("#tasks .filters")).to_contain_text("lane deployer")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "panel-dead.png"), full_page=True)

    # Requeue: the page says so, and the dead list no longer holds the task
    row.locator("button.requeue").click()
    expect(page.locator("#flash")).to_have_text(f"Task {dead} requeued.", timeout=WAIT_MS)
    expect(rows).to_have_count(0, timeout=WAIT_MS)
    assert dialogs == []  # the signed-in session may: no token asked

    # in the database: todo, attempts reset, the event's actor the panel's credential
    got = _task(ctx, dead)
    assert (got["status"], got["attempts"], got["lane_paused"]) == ("todo", 0, False)
    requeued = [e for e in got["events"] if e["kind"] == "task_requeued"]
    assert len(requeued) == 1
    assert requeued[0]["actor"] == "ops-alice"
    assert requeued[0]["data"]["actorNote"] == "panel"
    assert requeued[0]["data"]["lastValidationReason"] == "the vault refused the new chain"
    # and through the API's listing, as any client sees it
    listed = api_listing(server, secret, "deployer")
    assert listed[dead]["status"] == "todo" and listed[dead]["attempts"] == 0
    assert listed[waiting]["status"] == "todo"

    # the todo filter of the lane shows it back in the queue, no Requeue button
    page.locator("#tasks a[data-filter='todo']").click()
    expect(page).to_have_url(server.url + "/?status=todo&assignee=deployer", timeout=WAIT_MS)
    expect(rows).to_have_count(2, timeout=WAIT_MS)
    back = page.locator(f"#tasks tr[data-task='{dead}']")
    expect(back.locator(".st")).to_have_text("todo")
    expect(back.locator("td.num").nth(1)).to_have_text("0")
    expect(back.locator("button.requeue")).to_have_count(0)
    # the other lane's dead task was left alone
    assert _task(ctx, other_dead)["status"] == "dead"
    page.screenshot(path=str(OUTPUT / "panel-requeued.png"), full_page=True)


def api_listing(server: ServerThread, secret: str, lane: str) -> dict[int, dict[str, Any]]:
    resp = httpx.post(f"{server.url}/api/autonomy",
                      json={"action": "tasks", "assignee": lane},
                      headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return {t["id"]: t for t in resp.json()["tasks"]}
