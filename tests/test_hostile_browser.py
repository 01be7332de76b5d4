"""Cross-origin attacks from a real browser (SPEC 4.8): Playwright driving Debian's
chromium against a token-less loopback server. A page served by the test from another
loopback origin tries a ``text/plain`` form POST, a ``no-cors`` fetch and a JSON fetch:
nothing changes in the database. The panel's own Pause and Resume buttons (same-origin
JSON) still work.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from app.ops import lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests.api_server import ServerThread
from tests.conftest import make_settings
from tests.servers import free_port
from tests.test_panel_browser import WAIT_MS, browser  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ATTACK = """<!doctype html><html><head><title>cute cats</title></head><body>
<form id="form" method="POST" action="{api}/api/autonomy" enctype="text/plain">
  <input type="hidden" name='{{"action":"configure_lane","assignee":"coder","maxInFlight":777,"x":"'
         value='"}}'>
</form>
<script>
  var api = "{api}";
  window.results = {{}};
  fetch(api + "/api/autonomy", {{method: "POST", mode: "no-cors",
        headers: {{"Content-Type": "text/plain"}},
        body: JSON.stringify({{action: "pause_lane", assignee: "coder", reason: "pwned"}})}})
    .then(function () {{ window.results.nocors = "sent"; }},
          function (e) {{ window.results.nocors = "failed: " + e; }});
  fetch(api + "/api/autonomy", {{method: "POST",
        headers: {{"Content-Type": "application/json"}},
        body: JSON.stringify({{action: "configure_lane", assignee: "coder", maxInFlight: 555}})}})
    .then(function (r) {{ window.results.json = "answered " + r.status; }},
          function (e) {{ window.results.json = "blocked: " + e; }});
</script></body></html>"""


class AttackerSite:
    """A tiny HTTP server on another loopback origin serving the attack page."""

    def __init__(self, html: str) -> None:
        body = html.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.url = f"http://localhost:{self.port}"
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> AttackerSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def open_ctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """No API token: the loopback-only server a developer runs."""
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              panel_refresh_ms=500))
    yield ctx
    ctx.close()


@pytest.fixture
def server(open_ctx: Context) -> Iterator[ServerThread]:
    from app.api.app import create_app

    srv = ServerThread(create_app(ctx=open_ctx)).start()
    yield srv
    srv.stop()


def db_state(ctx: Context) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        lane = store.get_lane(conn, assignee="coder")
        events = store.list_events(conn, assignee="coder", limit=1000)
    assert lane is not None
    return {"paused": bool(lane["paused"]), "maxInFlight": lane["max_in_flight"],
            "events": len(events)}


def test_another_origin_changes_nothing_and_the_panel_buttons_still_work(
        browser: Browser, server: ServerThread, open_ctx: Context) -> None:  # noqa: F811
    lanes.create(open_ctx, assignee="coder", title="build it")
    before = db_state(open_ctx)
    assert before["paused"] is False and before["maxInFlight"] == 1
    context = browser.new_context()
    page: Page = context.new_page()
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: answers.append((r.request.method, r.status))
            if r.url.startswith(server.url + "/api/") else None)
    try:
        with AttackerSite(ATTACK.format(api=server.url)) as site:
            page.goto(site.url + "/")
            page.wait_for_function("() => window.results.nocors && window.results.json",
                                   timeout=WAIT_MS)
            results = page.evaluate("() => window.results")
            # the JSON fetch needs a CORS preflight, which the server refuses (403)
            assert results["json"].startswith("blocked"), results
            with page.expect_navigation(timeout=WAIT_MS) as nav:
                page.evaluate("() => document.getElementById('form').submit()")
            resp = nav.value
            assert resp is not None and resp.status == 403, resp and resp.text()
            assert json.loads(resp.text())["error"] == "forbidden_origin"
        # every attempt reached the server and was refused there
        assert answers and all(status in (403, 415) for _, status in answers), answers
        assert db_state(open_ctx) == before

        # the panel's own buttons: same-origin JSON, no token needed on this server
        page.goto(server.url + "/")
        row = page.locator("#lanes tr[data-lane='coder']")
        row.locator("button.pause").click()
        expect(row.locator(".badge.paused")).to_be_visible(timeout=WAIT_MS)
        assert db_state(open_ctx)["paused"] is True
        row.locator("button.resume").click()
        expect(row.locator(".badge.paused")).to_have_count(0, timeout=WAIT_MS)
        assert db_state(open_ctx)["paused"] is False
    finally:
        context.close()
