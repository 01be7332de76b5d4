"""Hostile HTTP (SPEC 4.8), against real servers: forged ``Host``, foreign ``Origin``,
non-JSON writes, poison strings (lone surrogates, NUL) at any depth, deep nesting, and
oversized bodies -- each refused with a 4xx and a stable code, nothing written, and the
database readable in full afterwards. The 400 MB body test measures the server's peak RSS
(a separate ``autonomy serve`` process, sampled with psutil).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.ops import lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests.api_server import client, serve
from tests.conftest import make_settings
from tests.servers import free_port

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hostile-token"


@pytest.fixture(params=["no-token", "token"])
def hctx(request: pytest.FixtureRequest, sqlite_url: str, redis_server_url: str,
         redis_prefix: str) -> Iterator[Context]:
    token = TOKEN if request.param == "token" else None
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_token=token))
    lanes.create(ctx, assignee="coder", title="first")
    yield ctx
    ctx.close()


def auth(ctx: Context) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"} if ctx.settings.api_token else {}


def snapshot(ctx: Context) -> dict[str, Any]:
    with transaction(ctx.engine, write=False) as conn:
        tasks = store.list_tasks(conn, assignee="coder")
        lane = store.get_lane(conn, assignee="coder")
        events = store.list_events(conn, assignee="coder", limit=10_000)
    return {"tasks": [dict(t) for t in tasks], "lane": dict(lane or {}), "events": len(events)}


def post_raw(http: httpx.Client, body: Any, **headers: str) -> httpx.Response:
    """POST ``body`` as JSON with every non-ASCII character escaped (so lone surrogates
    travel as ``\\udfff`` escapes, as any JSON client may send them)."""
    return http.post("/api/autonomy", content=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **headers})


def readable_in_full(http: httpx.Client, ctx: Context) -> None:
    h = auth(ctx)
    assert http.get("/api/autonomy/tasks", params={"limit": 500}, headers=h).status_code == 200
    assert http.get("/api/autonomy/status", headers=h).status_code == 200
    assert post_raw(http, {"action": "history", "assignee": "coder"}, **h).status_code == 200
    assert http.get("/", headers=h).status_code == 200


# --- Host, Origin, Content-Type ---------------------------------------------------------


def test_a_forged_host_is_refused_and_nothing_is_written(hctx: Context) -> None:
    before = snapshot(hctx)
    with client(hctx) as http:
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", ""):
            resp = post_raw(http, {"action": "pause_lane", "assignee": "coder"},
                            Host=host, **auth(hctx))
            assert resp.status_code == 421, (host, resp.text)
            assert resp.json()["error"] == "invalid_host"
            # reads too: a rebinding page cannot read the fleet either
            assert http.get("/api/autonomy/status", headers={"Host": host}).status_code == 421
        for host in ("localhost", f"localhost:{http.base_url.port}", "127.0.0.1", "[::1]:8",
                     "127.0.0.2"):
            assert http.get("/api/autonomy/status",
                            headers={"Host": host, **auth(hctx)}).status_code == 200, host
    assert snapshot(hctx) == before


def test_allowed_hosts_setting_names_the_hosts_served(sqlite_url: str, redis_server_url: str,
                                                      redis_prefix: str) -> None:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              allowed_hosts="ops.example, 127.0.0.1"))
    try:
        with client(ctx) as http:
            assert http.get("/api/autonomy/status",
                            headers={"Host": "ops.example:8000"}).status_code == 200
            assert http.get("/api/autonomy/status",
                            headers={"Host": "localhost"}).status_code == 421
    finally:
        ctx.close()


def test_a_foreign_origin_is_refused_and_nothing_is_written(hctx: Context) -> None:
    before = snapshot(hctx)
    with client(hctx) as http:
        for origin in ("http://evil.example", "http://localhost:1", "null",
                       f"https://127.0.0.1:{http.base_url.port}"):
            resp = post_raw(http, {"action": "configure_lane", "assignee": "coder",
                                   "maxInFlight": 777}, Origin=origin, **auth(hctx))
            assert resp.status_code == 403, (origin, resp.text)
            assert resp.json()["error"] == "forbidden_origin"
        own = f"http://127.0.0.1:{http.base_url.port}"
        assert snapshot(hctx) == before
        resp = post_raw(http, {"action": "status"}, Origin=own, **auth(hctx))
        assert resp.status_code == 200, resp.text


def test_writes_must_be_json(hctx: Context) -> None:
    before = snapshot(hctx)
    body = json.dumps({"action": "pause_lane", "assignee": "coder"}).encode()
    with client(hctx) as http:
        for ctype in ("text/plain", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", None):
            headers = {**auth(hctx), **({"Content-Type": ctype} if ctype else {})}
            resp = http.post("/api/autonomy", content=body, headers=headers)
            assert resp.status_code == 415, (ctype, resp.text)
            assert resp.json()["error"] == "unsupported_media_type"
        assert snapshot(hctx) == before
        resp = http.post("/api/autonomy", content=body,
                         headers={**auth(hctx), "Content-Type": "application/json; charset=utf-8"})
        assert resp.status_code == 200, resp.text
    assert snapshot(hctx)["lane"]["paused"] is True


def test_security_headers_on_the_panel_the_api_and_static_files(hctx: Context) -> None:
    with client(hctx) as http:
        for path in ("/", "/panel/sections", "/api/autonomy/status", "/static/panel.js",
                     "/metrics", "/nothing-here"):
            h = http.get(path).headers
            csp = h["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp, path
            assert "script-src 'self'" in csp and "style-src 'self'" in csp, path
            assert h["x-frame-options"] == "DENY", path
            assert h["x-content-type-options"] == "nosniff", path
            assert h["referrer-policy"] == "no-referrer", path
        page = http.get("/").text
        assert "<script>" not in page and " style=" not in page and "<style" not in page
        docs = http.get("/docs").headers["content-security-policy"]
        assert "frame-ancestors 'none'" in docs and "'sha256-" in docs


# --- poison strings and nesting ---------------------------------------------------------

POISON = ["\udfff", "a\ud800b", "nul\x00here"]


def _requests(text: str) -> list[tuple[dict[str, Any], str]]:
    """Every string field of every action holding ``text``, and the field named."""
    tok = "0" * 32
    return [
        ({"action": "create", "assignee": "coder", "title": text}, "title"),
        ({"action": "create", "assignee": "coder", "title": "t", "payload": {"k": text}},
         "payload.k"),
        ({"action": "create", "assignee": "coder", "title": "t",
          "payload": {"a": [{"b": {text: 1}}]}}, "payload.a[0].b"),
        ({"action": "create", "assignee": "coder", "title": "t",
          "payload": json.dumps({"k": [text]})}, "payload.k[0]"),
        ({"action": "create", "assignee": "coder", "title": "t", "actor": text}, "actor"),
        ({"action": "create", "assignee": text, "title": "t"}, "assignee"),
        ({"action": "claim", "assignee": "coder", "worker": text}, "worker"),
        ({"action": "pause_lane", "assignee": "coder", "reason": text}, "reason"),
        ({"action": "resume_lane", "assignee": "coder", "reason": text}, "reason"),
        ({"action": "ops_incident", "status": "warning", "reason": text}, "reason"),
        ({"action": "fingerprint_count", "fingerprint": text}, "fingerprint"),
        ({"action": "complete", "taskId": 1, "leaseToken": tok, "outcome": "failure",
          "validationReason": text}, "validationReason"),
        ({"action": "complete", "taskId": 1, "leaseToken": tok, "outcome": "success",
          "result": {"r": text}}, "result.r"),
        ({"action": "release", "taskId": 1, "leaseToken": text}, "leaseToken"),
        ({"action": "history", "assignee": text}, "assignee"),
        ({"action": text}, "action"),
        ({"action": "status", text: 1}, "request"),
    ]


def test_poison_strings_are_refused_naming_the_field_and_nothing_is_written(
        hctx: Context) -> None:
    before = snapshot(hctx)
    with client(hctx) as http:
        for text in POISON:
            for body, field in _requests(text):
                resp = post_raw(http, body, **auth(hctx))
                assert resp.status_code == 400, (body, resp.text)
                answer = resp.json()
                assert answer["error"] == "invalid_input", (body, answer)
                assert answer.get("field") == field, (body, answer)
        assert snapshot(hctx) == before
        readable_in_full(http, hctx)


def test_deep_nesting_given_as_an_object_or_a_string_is_a_400(hctx: Context) -> None:
    before = snapshot(hctx)
    deep = "[" * 990 + "]" * 990
    with client(hctx) as http:
        for payload in ('{"k": ' + deep + "}",  # a string holding it
                        '{"k": ' + "[" * 100_000,  # a string a parser would recurse on
                        {"k": json.loads("[" * 40 + "]" * 40)}):  # past json_max_depth
            resp = post_raw(http, {"action": "create", "assignee": "coder", "title": "t",
                                   "payload": payload}, **auth(hctx))
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"] == "invalid_payload", resp.text
        # a body nested past any parser's stack: still a 400, and the connection lives on
        raw = b'{"action": "create", "assignee": "coder", "title": "t", "payload": ' \
            + b"[" * 50_000 + b"]" * 50_000 + b"}"
        resp = http.post("/api/autonomy", content=raw,
                         headers={"Content-Type": "application/json", **auth(hctx)})
        assert resp.status_code == 400 and resp.json()["error"] == "invalid_input"
        # the same keep-alive client
        assert http.get("/api/autonomy/status", headers=auth(hctx)).status_code == 200
    assert snapshot(hctx) == before


# --- bounded bodies ---------------------------------------------------------------------


def _raw_request(port: int, head: str, body_bytes: int, *, chunked: bool = False,
                 chunk: int = 1 << 20) -> tuple[int, int]:
    """Send ``head`` then up to ``body_bytes`` of body (stopping when the server answers
    or closes); answers (status, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sent = 0
    stop = threading.Event()

    def pump() -> None:
        nonlocal sent
        block = b"x" * chunk
        try:
            sock.sendall(head.encode())
            while sent < body_bytes and not stop.is_set():
                n = min(chunk, body_bytes - sent)
                data = block[:n]
                if chunked:
                    data = f"{n:x}\r\n".encode() + data + b"\r\n"
                sock.sendall(data)
                sent += n
            if chunked and not stop.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: the rest is never read

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        first = b""
        while b"\r\n" not in first:
            data = sock.recv(4096)
            if not data:
                break
            first += data
        status = int(first.split(b" ", 2)[1]) if first else 0
    finally:
        stop.set()
        sock.close()
        t.join(30)
    return status, sent


def test_an_oversized_body_is_413_before_it_is_read_and_auth_comes_first(
        hctx: Context) -> None:
    before = snapshot(hctx)
    with serve(hctx) as server:
        head = ("POST /api/autonomy HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n")
        status, sent = _raw_request(server.port, head.format(n=400_000_000), 400_000_000)
        token = hctx.settings.api_token is not None
        assert status == (401 if token else 413)
        assert sent < 400_000_000  # answered long before the body could have been read
        chunked = ("POST /api/autonomy HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                   + (f"Authorization: Bearer {TOKEN}\r\n" if token else "") + "\r\n")
        status, sent = _raw_request(server.port, chunked, 50_000_000, chunked=True,
                                    chunk=64 * 1024)
        assert status == 413
        assert sent < 50_000_000
    assert snapshot(hctx) == before


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, TOKEN])
def test_400_mb_bodies_leave_the_server_within_a_few_mb_of_idle(
        token: str | None, sqlite_url: str, redis_server_url: str, redis_prefix: str,
        tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "AUTONOMY_DATABASE_URL": sqlite_url,
           "AUTONOMY_REDIS_URL": redis_server_url, "AUTONOMY_REDIS_PREFIX": redis_prefix}
    env.pop("AUTONOMY_API_TOKEN", None)
    if token:
        env["AUTONOMY_API_TOKEN"] = token
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                             "--no-access-log"], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/autonomy/status", timeout=5,
                             headers={"Authorization": f"Bearer {token}"} if token else {}
                             ).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        server = psutil.Process(proc.pid)
        idle = server.memory_info().rss
        peak = idle
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, server.memory_info().rss)
                done.wait(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        head = ("POST /api/autonomy HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nContent-Length: 400000000\r\n\r\n")
        chunked = ("POST /api/autonomy HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                   + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
        statuses = []
        for _ in range(3):
            statuses.append(_raw_request(port, head, 400_000_000)[0])
            statuses.append(_raw_request(port, chunked, 400_000_000, chunked=True)[0])
        done.set()
        sampler.join(5)
        growth_mb = (peak - idle) / 2**20
        print(f"token={'yes' if token else 'no'}: idle {idle / 2**20:.1f} MB, peak "
              f"{peak / 2**20:.1f} MB (+{growth_mb:.1f} MB) over 6 bodies of 400 MB "
              f"-> {statuses}")
        assert statuses == [401 if token else 413, 413] * 3
        assert growth_mb < 10, f"peak {peak / 2**20:.1f} MB vs idle {idle / 2**20:.1f} MB"
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
