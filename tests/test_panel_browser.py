"""The control panel in a real browser: Playwright driving Debian's chromium (headless)
against a real server. A lane paused through the API shows the amber badge on the lane and
its tasks, and the recent events show the pause with the credential as actor and the
caller's own actor as a note (a hostile note as text); Resume resumes it in the database
and the badge goes; a held run-lock shows in the run-lock table, red once over budget. A
screenshot is saved to ``test-output/panel.png``.

Needs ``/usr/bin/chromium`` (``scripts/ensure-chromium`` installs it; ``make test`` runs it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.ops import lane_control, lanes
from app.storage import locks, store
from app.storage.context import Context
from app.storage.db import transaction
from tests.api_server import ServerThread
from tests.conftest import make_settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
TOKEN = "panel-test-token"
AMBER_BG = "rgb(254, 243, 199)"  # --amber-bg in panel.css
RED_BG = "rgb(254, 226, 226)"    # --nogo-bg
WAIT_MS = 15_000
HOSTILE = '<img src=x onerror="window.__pwned=1">'

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), \
        "the browser test needs Debian's chromium: run scripts/ensure-chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def panel_ctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """A real-clock context with an API token and a fast panel refresh."""
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_token=TOKEN, panel_refresh_ms=500))
    yield ctx
    ctx.close()


@pytest.fixture
def server(panel_ctx: Context) -> Iterator[ServerThread]:
    from app.api.app import create_app

    srv = ServerThread(create_app(ctx=panel_ctx)).start()
    yield srv
    srv.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
          if m.type == "error" else None)
    yield pg
    context.close()
    assert problems == []


def api(server: ServerThread, action: str, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(f"{server.url}/api/autonomy", json={"action": action, **fields},
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def sign_in(page: Page, server: ServerThread, secret: str) -> None:
    """The panel asks for a credential first (SPEC 4.10): the login form, then the panel."""
    page.goto(server.url + "/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", secret)
    page.click("#login button[type=submit]")
    expect(page.locator("#sections")).to_be_visible(timeout=WAIT_MS)


def lane_paused_in_db(ctx: Context, assignee: str) -> tuple[bool, list[bool]]:
    with transaction(ctx.engine, write=False) as conn:
        lane = store.get_lane(conn, assignee=assignee)
        tasks = store.list_tasks(conn, assignee=assignee)
    assert lane is not None
    return bool(lane["paused"]), [bool(t["lane_paused"]) for t in tasks
                                  if t["status"] in ("todo", "in_progress")]


def test_pause_shows_the_amber_badge_and_resume_clears_it_in_the_db(
        server: ServerThread, panel_ctx: Context, page: Page) -> None:
    for i in range(3):
        lanes.create(panel_ctx, assignee="coder", title=f"Implement feature {i}")
    for i in range(2):
        lanes.create(panel_ctx, assignee="reviewer", title=f"Review change {i}")
    lanes.claim(panel_ctx, assignee="coder", worker="coder-1")
    dialogs: list[str] = []

    def answer_prompt(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept(TOKEN)

    page.on("dialog", answer_prompt)
    # a hostile note (the API refuses such actors; the page must not trust the database)
    with transaction(panel_ctx.engine) as conn:
        store.insert_event(conn, kind="lane_configured", at=panel_ctx.clock(),
                           assignee="reviewer", actor="bootstrap",
                           data={"actorNote": HOSTILE})
    # signed in as an operator: its session (an HttpOnly cookie) carries the changes too
    sign_in(page, server, TOKEN)
    coder_lane = page.locator("#lanes tr[data-lane='coder']")
    expect(coder_lane).to_be_visible()
    expect(coder_lane.locator(".badge.paused")).to_have_count(0)

    # paused through the API: the page picks it up on its own refresh, no reload
    api(server, "pause_lane", assignee="coder", reason="flaky deploy pipeline", actor="ops")
    badge = coder_lane.locator(".badge.paused")
    expect(badge).to_be_visible(timeout=WAIT_MS)
    expect(badge).to_have_text("paused", ignore_case=True)
    expect(badge).to_have_attribute("title", "Paused: flaky deploy pipeline — since "
                                    + _since(panel_ctx, "coder"))
    # retried: the refresh may swap the section between finding the node and reading it
    expect(badge).to_have_css("background-color", AMBER_BG)
    # the recent events show who paused it: the credential, and the caller's actor as a note
    paused_ev = page.locator("#events tr[data-kind='lane_paused']").first
    expect(paused_ev).to_be_visible(timeout=WAIT_MS)
    expect(paused_ev.locator(".actor")).to_have_text("bootstrap")
    expect(paused_ev.locator(".note-text")).to_have_text("ops")
    expect(paused_ev.locator(".why")).to_have_text("flaky deploy pipeline")
    # the hostile note is text, after the first paint and after refreshes (innerHTML swaps)
    expect(page.locator("#events tr[data-kind='lane_configured'] .note-text")
           ).to_have_text(HOSTILE)
    expect(page.locator("#events img")).to_have_count(0)
    assert page.evaluate("window.__pwned") is None
    coder_tasks = page.locator("#tasks tr[data-lane='coder']")
    expect(coder_tasks).to_have_count(3)
    expect(coder_tasks.locator(".badge.paused")).to_have_count(3)
    expect(page.locator("#tasks tr[data-lane='reviewer'] .badge.paused")).to_have_count(0)
    expect(page.locator("#lanes tr[data-lane='reviewer'] button.resume")).to_have_count(0)

    # a held run-lock shows in the run-lock table; over its budget, in red
    held = locks.acquire(panel_ctx, "handoff_health", budget_ms=60_000, holder="test:1:held")
    over = locks.acquire(panel_ctx, "self_heal", budget_ms=1, holder="test:2:over")
    try:
        lock_row = page.locator("#locks tr[data-job='handoff_health']")
        expect(lock_row).to_be_visible(timeout=WAIT_MS)
        expect(lock_row).to_contain_text("test:1:held")
        expect(lock_row).to_contain_text("/ 1m 00s")
        over_row = page.locator("#locks tr[data-job='self_heal']")
        expect(over_row).to_have_class("over", timeout=WAIT_MS)
        expect(over_row).to_contain_text("over budget", ignore_case=True)
        expect(over_row.locator("td").first).to_have_css("background-color", RED_BG)
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "panel.png"), full_page=True)
    finally:
        locks.release(panel_ctx, "handoff_health", held)
        locks.release(panel_ctx, "self_heal", over)
    expect(page.locator("#locks tr[data-job]")).to_have_count(0, timeout=WAIT_MS)

    # Resume: the signed-in session may; nothing is asked, the lane resumes in the database
    page.locator("#lanes tr[data-lane='coder'] button.resume").click()
    expect(coder_lane.locator(".badge.paused")).to_have_count(0, timeout=WAIT_MS)
    expect(coder_tasks.locator(".badge.paused")).to_have_count(0, timeout=WAIT_MS)
    assert lane_paused_in_db(panel_ctx, "coder") == (False, [False, False, False])
    assert dialogs == []
    # the panel's own resume: the signed-in credential, "panel" only a note
    resumed_ev = page.locator("#events tr[data-kind='lane_resumed']").first
    expect(resumed_ev.locator(".actor")).to_have_text("bootstrap", timeout=WAIT_MS)
    expect(resumed_ev.locator(".note-text")).to_have_text("panel")

    # and again
    lane_control.pause_lane(panel_ctx, assignee="coder", reason="again", actor="ops")
    expect(coder_lane.locator("button.resume")).to_be_visible(timeout=WAIT_MS)
    coder_lane.locator("button.resume").click()
    expect(coder_lane.locator(".badge.paused")).to_have_count(0, timeout=WAIT_MS)
    assert lane_paused_in_db(panel_ctx, "coder")[0] is False
    assert dialogs == []
    page.screenshot(path=str(OUTPUT / "panel-resumed.png"), full_page=True)


def _since(ctx: Context, assignee: str) -> str:
    from app.api.panel import fmt_time
    from app.clock import iso

    with transaction(ctx.engine, write=False) as conn:
        lane = store.get_lane(conn, assignee=assignee)
    assert lane is not None
    return fmt_time(iso(lane["paused_at"]))


def test_the_beat_leader_shows_apart_from_the_run_locks_with_its_ttl(
        server: ServerThread, panel_ctx: Context, page: Page) -> None:
    from app.api.panel import fmt_duration
    from app.storage import leader

    sign_in(page, server, TOKEN)
    expect(page.locator("[data-beat-leader='']")).to_contain_text("no leader")
    token, _ = leader.acquire(panel_ctx, "test:9:beat")
    leader.stand_by(panel_ctx, "test:10:beat")
    try:
        line = page.locator("[data-beat-leader='test:9:beat']")
        expect(line).to_be_visible(timeout=WAIT_MS)
        expect(line).to_contain_text("TTL " + fmt_duration(panel_ctx.settings.beat_lease_ttl_ms))
        expect(line).to_contain_text("lease renewed")
        expect(page.locator("#locks")).to_contain_text("standbys: test:10:beat")
        expect(page.locator("#locks tr[data-job='beat']")).to_have_count(0)
    finally:
        assert token is not None
        leader.release(panel_ctx, token)
