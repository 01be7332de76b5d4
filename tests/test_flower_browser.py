"""Flower's own UI shows the run-locks: Playwright with Debian's chromium against a real
``autonomy up`` (its embedded Redis, a SQLite file, the real worker, beat and Flower).

The readiness job is kept running 25 s of its 30 s budget, so a real worker holds its
run-lock. Flower's worker page (tab "Other", the worker's stats) shows the lock with its
holder, elapsed time and budget, and the beat leader lease; the ``tasks.checks.status``
task's page shows its result in full (no ``{...}``). Screenshots go to ``test-output/``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from playwright.sync_api import Browser, Page, sync_playwright

from tests.servers import free_port
from tests.test_panel_browser import CHROMIUM, CHROMIUM_ARGS, OUTPUT
from tests.test_up import READY, Proc, assert_all_gone, base_env, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.browser]

WAIT_S = 60.0


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            for child in p.descendants():
                child.kill()
            p.proc.kill()
            p.proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), \
        "the browser test needs Debian's chromium: run scripts/ensure-chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    yield context.new_page()
    context.close()


def _until(what: str, pred: Any, p: Proc, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        if p.proc.poll() is not None:
            break
        time.sleep(0.25)
    raise AssertionError(f"{what} not seen; output:\n{p.output[-6000:]}")


def test_flower_shows_a_held_run_lock_with_elapsed_and_budget_and_the_status_in_full(
        tmp_path: Path, procs: list[Proc], page: Page) -> None:
    port, flower_port = free_port(), free_port()
    env = base_env(tmp_path, AUTONOMY_BEAT_EVERY_S="2",
                   AUTONOMY_JOB_MIN_RUNTIME_MS='{"readiness": 25000}')
    p = run_cli(procs, env, tmp_path, "up", "--port", str(port),
                "--flower-port", str(flower_port))
    p.wait_for(READY, timeout_s=120)
    api, flower = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{flower_port}"

    def readiness_lock() -> dict[str, Any] | None:
        st = httpx.get(f"{api}/api/autonomy/status", timeout=30).json()
        return next((lk for lk in st["workflowHealth"]["runLocks"]
                     if lk["job"] == "readiness" and lk["elapsedMs"] >= 1000), None)

    lock = _until("the readiness run-lock held by the worker", readiness_lock, p)
    worker = f"autonomy-{p.proc.pid}@{socket.gethostname()}"
    assert int(lock["holder"].split(":")[1]) in [c.pid for c in p.descendants()]

    # the worker's page: stats -> tab "Other" -> one line per held lock
    row = page.locator("#tab-other tr", has_text="run-lock readiness")

    def worker_page_shows_the_lock() -> bool:
        page.goto(f"{flower}/worker/{worker}")  # stats are fetched as the page loads
        tab = page.locator("#worker-tab-other")
        if tab.count() == 0:  # Flower has not got the worker's stats yet
            return False
        tab.click()
        return row.count() == 1 and row.is_visible()

    _until("the run-lock on Flower's worker page", worker_page_shows_the_lock, p)
    text = row.inner_text()
    m = re.search(r"holder (\S+) · elapsed ([\d.]+) s of 30\.0 s budget · within budget · "
                  r"holder alive", text)
    assert m, text
    assert m.group(1) == lock["holder"] and float(m.group(2)) >= 1.0
    beat_row = page.locator("#tab-other tr", has_text="beat leader lease")
    assert "TTL 10.0 s" in beat_row.inner_text()
    assert page.locator("#tab-other tr", has_text="runLocks").count() >= 1
    # the tab fades in: wait until it is fully shown before the screenshot
    page.wait_for_function(
        "getComputedStyle(document.querySelector('#tab-other')).opacity === '1'")
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "flower-worker-run-locks.png"
    page.screenshot(path=str(shot), full_page=True)

    # the status task's page: the result rendered in full, the run-locks first
    # (found in the result backend: Flower's JSON API is off without authentication)
    redis_url = re.search(r"REDIS_URL=(\S+)", p.wait_for("second terminal:"))
    assert redis_url
    r = redis_lib.Redis.from_url(redis_url.group(1), decode_responses=True)

    def a_status_task_with_the_lock() -> str | None:
        for key in r.scan_iter("autonomy:celery:celery-task-meta-*"):
            meta = json.loads(r.get(key) or "{}")
            locks = (meta.get("result") or {}).get("workflowHealth.runLocks") or []
            if meta.get("name") == "tasks.checks.status" and meta.get("status") == "SUCCESS" \
                    and any(lk["job"] == "readiness" for lk in locks):
                return str(meta["task_id"])
        return None

    task_id = _until("a status task whose result lists the lock", a_status_task_with_the_lock,
                     p)
    r.close()
    result = ""

    def task_page_shows_the_result() -> bool:
        nonlocal result
        page.goto(f"{flower}/task/{task_id}")
        code = page.locator(".task-data-row", has=page.locator("dt", has_text="Result"))
        result = code.locator("code").inner_text() if code.count() else ""
        return "workflowHealth.runLocks" in result

    _until("the status task's result on its Flower page", task_page_shows_the_result, p)
    assert result.startswith("{'workflowHealth.runLocks': [{'job': ")
    assert "'job': 'readiness'" in result and "'budgetMs': 30000" in result
    assert "{...}" not in result and "[...]" not in result
    page.screenshot(path=str(OUTPUT / "flower-status-task.png"), full_page=True)

    children = [c.pid for c in p.descendants()]
    assert p.stop() == 0
    assert_all_gone(children)
    assert shot.exists()
