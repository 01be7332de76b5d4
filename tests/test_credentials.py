"""Who may do what (SPEC 4.10, issue 20), black-box over HTTP against real servers: each
scope against every action in its own lane and another, the lease token no other
credential can learn or use, the actor the audit trail records, the panel's login,
revocation across two API processes. Each table and figure is printed (``-s``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.clock import FrozenClock
from app.ops import credentials, lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests.api_server import serve
from tests.conftest import make_settings
from tests.servers import free_port

REPO = Path(__file__).resolve().parent.parent
BOOT = "bootstrap-token-for-credential-tests"


@pytest.fixture
def cctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """A server context with the bootstrap token and three minted credentials."""
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_token=BOOT))
    yield ctx
    ctx.close()


@pytest.fixture
def bctx(database_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    """``cctx`` on each backend (PostgreSQL writes some events in its own functions)."""
    ctx = Context.from_settings(make_settings(database_url, redis_server_url, redis_prefix,
                                              api_token=BOOT))
    yield ctx
    ctx.close()


def mint(ctx: Context, name: str, scope: str, **kw: Any) -> str:
    secret: str = credentials.create(ctx, name=name, scope=scope, created_by="test", **kw)[
        "secret"]
    return secret


def post(http: httpx.Client, secret: str | None, action: str, **fields: Any
         ) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return http.post("/api/autonomy", json={"action": action, **fields}, headers=headers)


def ok(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def events(http: httpx.Client, **where: Any) -> list[dict[str, Any]]:
    evs: list[dict[str, Any]] = ok(post(http, BOOT, "history", **where))["events"]
    return evs


# --- credential x action x lane ----------------------------------------------------------

ACTIONS = ["create", "claim", "heartbeat", "release", "complete", "configure_lane",
           "pause_lane", "resume_lane", "ops_incident", "status", "history",
           "fingerprint_count", "GET tasks", "GET status", "GET /"]
WORKER_OK = {"claim", "heartbeat", "release", "complete"}
READ_OK = {"status", "history", "fingerprint_count", "GET tasks", "GET status", "GET /"}


def expected(scope: str, action: str, own: bool) -> str:
    if scope == "operator":
        allowed = True
    elif scope == "worker":
        allowed = action in WORKER_OK and own
    else:
        allowed = action in READ_OK
    return "200" if allowed else "403 forbidden_scope"


def test_each_scope_may_do_what_it_should_in_its_lane_and_nothing_else(cctx: Context) -> None:
    """3 scopes x every action x own/other lane -> the expected answer; a refused claim
    or action is an event naming the credential."""
    secrets = {"operator": mint(cctx, "ops-alice", "operator"),
               "worker": mint(cctx, "agent-7", "worker", lanes=["coder"]),
               "read": mint(cctx, "dash", "read")}
    table: dict[tuple[str, str, str], str] = {}
    with serve(cctx) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        for lane in ("coder", "reviewer"):
            ok(post(http, BOOT, "configure_lane", assignee=lane, maxInFlight=50))
            for i in range(12):
                ok(post(http, BOOT, "create", assignee=lane, title=f"{lane} {i}"))
        for scope, secret in secrets.items():
            for lane in ("coder", "reviewer"):
                own = scope != "worker" or lane == "coder"
                worker = "agent-7" if scope == "worker" else f"{scope}-w"
                # a lease the caller holds if it may claim; else the operator's
                holder = secret if scope != "read" and own else BOOT
                holder_worker = worker if holder == secret else f"setup-{scope}-{lane}"

                def lease(holder: str = holder, hw: str = holder_worker, ln: str = lane
                          ) -> tuple[int, str]:
                    a = ok(post(http, holder, "claim", assignee=ln, worker=hw))
                    return a["task"]["id"], a["lease"]["token"]

                answers: dict[str, httpx.Response] = {}
                answers["create"] = post(http, secret, "create", assignee=lane, title="x")
                answers["claim"] = post(http, secret, "claim", assignee=lane, worker=worker)
                if answers["claim"].status_code == 200:  # give it back for the next steps
                    c = answers["claim"].json()
                    ok(post(http, secret, "release", taskId=c["task"]["id"],
                            leaseToken=c["lease"]["token"]))
                tid, tok = lease()
                answers["heartbeat"] = post(http, secret, "heartbeat", taskId=tid,
                                            leaseToken=tok)
                answers["release"] = post(http, secret, "release", taskId=tid, leaseToken=tok)
                tid, tok = lease()
                answers["complete"] = post(http, secret, "complete", taskId=tid,
                                           leaseToken=tok, outcome="success")
                answers["configure_lane"] = post(http, secret, "configure_lane",
                                                 assignee=lane, maxInFlight=50)
                answers["pause_lane"] = post(http, secret, "pause_lane", assignee=lane,
                                             reason="table")
                answers["resume_lane"] = post(http, secret, "resume_lane", assignee=lane)
                ok(post(http, BOOT, "resume_lane", assignee=lane))
                answers["ops_incident"] = post(http, secret, "ops_incident", status="ok")
                answers["status"] = post(http, secret, "status")
                answers["history"] = post(http, secret, "history", assignee=lane)
                answers["fingerprint_count"] = post(http, secret, "fingerprint_count",
                                                    fingerprint=f"{lane}:x")
                h = {"Authorization": f"Bearer {secret}"}
                answers["GET tasks"] = http.get("/api/autonomy/tasks",
                                                params={"assignee": lane}, headers=h)
                answers["GET status"] = http.get("/api/autonomy/status", headers=h)
                answers["GET /"] = http.get("/", headers=h)
                for action, resp in answers.items():
                    got = str(resp.status_code) if resp.status_code == 200 else \
                        f"{resp.status_code} {resp.json().get('error')}"
                    table[(scope, action, "own" if lane == "coder" else "other")] = got
        refused = [e for e in events(http, assignee="reviewer") if e["kind"] ==
                   "forbidden_scope"]
    cols = [(s, w) for s in ("operator", "worker", "read") for w in ("own", "other")]
    print("\n" + f"{'action':<18}" + "".join(f"{s + '/' + w:<22}" for s, w in cols))
    wrong = []
    for action in ACTIONS:
        cells = []
        for s, w in cols:
            got = table.get((s, action, w), "-")
            want = expected(s, action, w == "own")
            cells.append(f"{got:<22}")
            if got != want:
                wrong.append((s, action, w, got, want))
        print(f"{action:<18}" + "".join(cells))
    assert not wrong, wrong
    # a worker's claim in another lane is an event with the credential as actor
    assert any(e["actor"] == "agent-7" and e["data"].get("action") == "claim"
               for e in refused), refused


# --- lease tokens ------------------------------------------------------------------------


def test_a_claim_naming_another_worker_never_learns_its_lease_token(bctx: Context) -> None:
    """Issue 20's theft: a claim naming w-victim answered w-victim's live token, and a
    complete with it finished w-victim's task with a forged result. Now: a worker
    credential may not claim as another name (403, an event); a credential that may
    (an operator, a shared prefix) gets the guard without the token; a token learnt
    anyway is refused to any credential but its holder's."""
    victim = mint(bctx, "w-victim", "worker", lanes=["coder"])
    thief = mint(bctx, "w-thief", "worker", lanes=["coder"])
    prefix = mint(bctx, "pool", "worker", lanes=["coder"], worker_prefix="w-")
    op = mint(bctx, "ops-alice", "operator")
    names = {victim: "w-victim", thief: "w-thief", prefix: "pool (w-*)", op: "ops-alice"}
    shown: list[str] = []

    def show(who: str, what: str, resp: httpx.Response) -> httpx.Response:
        a = resp.json()
        got = (f"{resp.status_code} {a.get('error')}" if resp.status_code != 200 else
               f"200 guard={a.get('guard')} leaseHolder={a.get('leaseHolder')} "
               f"lease={'THE TOKEN' if 'lease' in a else 'absent'}"
               if "guard" in a else f"200 {a.get('task', {}).get('status')}")
        shown.append(f"{names[who]:<11} {what:<46} -> {got}")
        return resp

    with serve(bctx) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        tid = ok(post(http, op, "create", assignee="coder", title="victim's task"))["task"]["id"]
        mine = ok(post(http, victim, "claim", assignee="coder", worker="w-victim"))
        token = mine["lease"]["token"]
        resp = show(thief, "claim as w-victim",
                    post(http, thief, "claim", assignee="coder", worker="w-victim"))
        assert resp.status_code == 403 and resp.json()["error"] == "forbidden_scope"
        for who in (op, prefix):
            guard = ok(show(who, "claim as w-victim (w-victim holds a live lease)",
                            post(http, who, "claim", assignee="coder", worker="w-victim")))
            assert guard["guard"] == "duplicate_claim_guard"
            assert guard["leaseHolder"] == "w-victim"
            assert "lease" not in guard and token not in json.dumps(guard)
        # the holder's own retried claim still gets its lease back
        again = ok(post(http, victim, "claim", assignee="coder", worker="w-victim"))
        assert again["lease"]["token"] == token
        for who in (thief, op, prefix):
            for action, extra in (("complete", {"outcome": "success",
                                                "result": {"forged": True}}),
                                  ("heartbeat", {}), ("release", {})):
                r = show(who, f"{action} with w-victim's token"
                         + (' result={"forged": true}' if action == "complete" else ""),
                         post(http, who, action, taskId=tid, leaseToken=token, **extra))
                assert r.status_code == 403 and r.json()["error"] == "forbidden_scope", r.text
        task = ok(post(http, op, "history", taskId=tid))
        assert [e for e in task["events"] if e["kind"] == "forbidden_scope"]
        done = ok(show(victim, "complete with its own token", post(
            http, victim, "complete", taskId=tid, leaseToken=token, outcome="success",
            result={"by": "victim"})))
        assert done["task"]["status"] == "done" and done["task"]["result"] == {"by": "victim"}
        kinds = [(e["kind"], e["actor"]) for e in events(http, taskId=tid)]
        print("\n" + "\n".join(shown) + "\nevents:", kinds)
        assert ("task_completed", "w-victim") in kinds
        assert ("forbidden_scope", "w-thief") in kinds


# --- the actor ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_recorded_actor_is_the_credential_and_a_claimed_actor_only_a_note(
        bctx: Context, tmp_path: Path) -> None:
    worker = mint(bctx, "agent-7", "worker", lanes=["coder"])
    op = mint(bctx, "ops-alice", "operator")
    with serve(bctx) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        tid = ok(post(http, op, "create", assignee="coder", title="t", actor="root"))[
            "task"]["id"]
        lease = ok(post(http, worker, "claim", assignee="coder", worker="agent-7"))["lease"]
        ok(post(http, worker, "complete", taskId=tid, leaseToken=lease["token"],
                outcome="success", actor="security-team"))
        ok(post(http, op, "create", assignee="coder", title="for the operator"))
        ok(post(http, op, "claim", assignee="coder", worker="w-op"))
        ok(post(http, op, "pause_lane", assignee="coder", reason="r", actor="admin"))
        ok(post(http, op, "resume_lane", assignee="coder"))
        every = events(http, assignee="coder")
    evs = {e["kind"]: e for e in reversed(every)}  # the newest of each kind
    evs["task_created"] = next(e for e in every if e["kind"] == "task_created"
                               and e["taskId"] == tid)
    print("\n" + "\n".join(f"{k:<16} actor={e['actor']!r:<14} note={e['actorNote']!r}"
                           for k, e in evs.items()))
    assert (evs["task_created"]["actor"], evs["task_created"]["actorNote"]) == \
        ("ops-alice", "root")
    assert (evs["task_completed"]["actor"], evs["task_completed"]["actorNote"]) == \
        ("agent-7", "security-team")
    assert (evs["lane_paused"]["actor"], evs["lane_paused"]["actorNote"]) == \
        ("ops-alice", "admin")
    assert (evs["lane_resumed"]["actor"], evs["lane_resumed"]["actorNote"]) == \
        ("ops-alice", None)
    assert (evs["lease_granted"]["actor"], evs["lease_granted"]["actorNote"]) == \
        ("ops-alice", "w-op")
    # the CLI shows both, and acting on the database itself records the OS user
    env = {**os.environ, "AUTONOMY_DATABASE_URL": bctx.settings.database_url,
           "AUTONOMY_REDIS_URL": bctx.settings.effective_redis_url,
           "AUTONOMY_REDIS_PREFIX": bctx.settings.redis_prefix}
    subprocess.run([sys.executable, "-m", "app.cli", "pause", "coder", "--actor", "admin",
                    "--json"], env=env, cwd=REPO, check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "app.cli", "history", "--lane", "coder",
                          "--json"], env=env, cwd=REPO, check=True, capture_output=True)
    newest = json.loads(out.stdout)["events"][0]
    assert newest["kind"] == "lane_paused" and newest["actor"].startswith("cli:")
    assert newest["actorNote"] == "admin"


# --- the panel -----------------------------------------------------------------------------


def test_the_panel_without_a_credential_is_a_login_and_shows_nothing(cctx: Context) -> None:
    reader = mint(cctx, "dash", "read")
    worker = mint(cctx, "agent-7", "worker", lanes=["coder"])
    lanes.create(cctx, assignee="coder", title="secret project title")
    with serve(cctx) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        page = http.get("/")
        assert page.status_code == 200 and "Sign in" in page.text
        assert "secret project title" not in page.text
        assert "unsafe-inline" not in page.headers["content-security-policy"]
        assert "<script>" not in page.text  # login.js, from /static
        for path in ("/panel/sections", "/api/autonomy/status", "/api/autonomy/tasks"):
            assert http.get(path).status_code == 401, path
        assert http.get("/livez").status_code == 200
        assert http.get("/readyz").status_code in (200, 503)
        assert http.get("/metrics").status_code == 200
        assert "secret project title" not in http.get("/metrics").text
        bad = http.post("/login", json={"token": "aut_wrong"})
        assert bad.status_code == 403 and "set-cookie" not in bad.headers
        assert http.post("/login", json={"token": worker}).status_code == 403
        # another site's page cannot log anyone in
        assert http.post("/login", json={"token": reader},
                         headers={"Origin": "https://evil.example"}).status_code == 403
        good = http.post("/login", json={"token": reader})
        assert good.status_code == 200, good.text
        cookie = good.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        shown = http.get("/")  # the client keeps the cookie
        assert shown.status_code == 200 and "secret project title" in shown.text
        http.post("/logout", json={})
        assert "Sign in" in http.get("/").text


class _EventRows(HTMLParser):
    """The panel's recent-events rows: each ``tr[data-kind]`` in ``#events`` as its
    cells' text by class (``actor``, ``note``, ...), and every tag seen in the section
    (a hostile note must add none)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.tags: list[str] = []
        self._in_events = False
        self._depth = 0
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("id") == "events":
            self._in_events, self._depth = True, 0
        if not self._in_events:
            return
        self.tags.append(tag)
        if tag == "section":
            self._depth += 1
        elif tag == "tr" and a.get("data-kind"):
            self.rows.append({"kind": a["data-kind"] or ""})
        elif tag == "td" and self.rows:
            classes = (a.get("class") or "").split()
            self._cell = next((c for c in ("actor", "why") if c in classes), "")
        elif tag == "span" and "note-text" in (a.get("class") or "").split():
            self._cell = "note"  # the note's text, without its "note" badge

    def handle_endtag(self, tag: str) -> None:
        if self._in_events and tag == "section":
            self._depth -= 1
            self._in_events = self._depth > 0
        elif tag in ("td", "span"):
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_events and self._cell and self.rows:
            row = self.rows[-1]
            row[self._cell] = (row.get(self._cell, "") + data).strip()


def event_rows(html: str) -> _EventRows:
    parser = _EventRows()
    parser.feed(html)
    return parser


def test_the_panel_shows_recent_events_with_the_credential_as_actor_and_the_note_beside(
        cctx: Context) -> None:
    """Issue 20's "history, panel and CLI show both": an event made by credential
    ops-alice whose request said actor "security-team" shows on the panel with ops-alice
    as actor and security-team as a note; hostile text in a note or reason shows as text
    (escaped), and no event shows without a credential."""
    op = mint(cctx, "ops-alice", "operator")
    reader = mint(cctx, "dash", "read")
    hostile = '<img src=x onerror="alert(1)">'
    with serve(cctx) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        ok(post(http, op, "pause_lane", assignee="coder", reason=f"deploy {hostile}",
                actor="security-team"))
        # a note the API would refuse (actors are names), as if written by an older
        # version or by hand: the page escapes whatever the database holds
        with transaction(cctx.engine) as conn:
            store.insert_event(conn, kind="lane_resumed", at=cctx.clock(), assignee="coder",
                               actor="ops-alice", data={"actorNote": hostile})
        locked = http.get("/")
        assert "Sign in" in locked.text and "security-team" not in locked.text
        assert "ops-alice" not in locked.text and "onerror" not in locked.text
        assert http.get("/panel/sections").status_code == 401
        for path in ("/", "/panel/sections"):
            resp = http.get(path, headers={"Authorization": f"Bearer {reader}"})
            assert resp.status_code == 200, resp.text
            parsed = event_rows(resp.text)
            rows = {r["kind"]: r for r in parsed.rows}
            print(f"\n{path}: " + "\n  ".join(
                f"{r['kind']:<14} actor={r.get('actor')!r:<13} note={r.get('note')!r} "
                f"reason={r.get('why')!r}" for r in parsed.rows))
            assert rows["lane_paused"]["actor"] == "ops-alice"
            assert rows["lane_paused"]["note"] == "security-team"
            assert rows["lane_paused"]["why"] == f"deploy {hostile}"  # shown as text
            assert rows["lane_resumed"]["note"] == hostile
            assert "img" not in parsed.tags  # no element came of either
            assert "&lt;img src=x onerror=" in resp.text
            # newest first: the resume was written after the pause
            assert [r["kind"] for r in parsed.rows][:2] == ["lane_resumed", "lane_paused"]


# --- revocation across two processes -------------------------------------------------------


def _serve_proc(ctx: Context, tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "AUTONOMY_DATABASE_URL": ctx.settings.database_url,
           "AUTONOMY_REDIS_URL": ctx.settings.effective_redis_url,
           "AUTONOMY_REDIS_PREFIX": ctx.settings.redis_prefix, "AUTONOMY_API_TOKEN": BOOT}
    log = (tmp / f"{name}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                             "--no-access-log"], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/livez", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp / f"{name}.log").read_text()
        time.sleep(0.05)


@pytest.mark.slow
def test_a_revoked_credential_is_refused_by_every_api_process_within_a_second(
        cctx: Context, tmp_path: Path) -> None:
    env = {**os.environ, "AUTONOMY_DATABASE_URL": cctx.settings.database_url,
           "AUTONOMY_REDIS_URL": cctx.settings.effective_redis_url,
           "AUTONOMY_REDIS_PREFIX": cctx.settings.redis_prefix}
    made = subprocess.run([sys.executable, "-m", "app.cli", "token", "create", "--scope",
                           "worker", "--lane", "coder", "--name", "agent-7", "--json"],
                          env=env, cwd=REPO, check=True, capture_output=True)
    secret = json.loads(made.stdout)["secret"]
    listed = subprocess.run([sys.executable, "-m", "app.cli", "token", "list", "--json"],
                            env=env, cwd=REPO, check=True, capture_output=True)
    assert secret not in listed.stdout.decode()
    assert [c["name"] for c in json.loads(listed.stdout)["credentials"]] == ["agent-7"]
    procs = [_serve_proc(cctx, tmp_path, n) for n in ("api-a", "api-b")]
    try:
        body = {"action": "claim", "assignee": "coder", "worker": "agent-7"}
        auth = {"Authorization": f"Bearer {secret}"}
        for _, url in procs:  # both know it (and have it cached)
            for _ in range(3):
                assert httpx.post(f"{url}/api/autonomy", json=body, headers=auth,
                                  timeout=10).status_code == 200
        subprocess.run([sys.executable, "-m", "app.cli", "token", "revoke", "agent-7",
                        "--json"], env=env, cwd=REPO, check=True, capture_output=True)
        revoked_at = time.monotonic()
        took: dict[str, float] = {}
        while len(took) < len(procs) and time.monotonic() - revoked_at < 5:
            for _, url in procs:
                if url not in took and httpx.post(f"{url}/api/autonomy", json=body,
                                                  headers=auth, timeout=10).status_code == 403:
                    took[url] = time.monotonic() - revoked_at
        print(f"\nrefused after revoke: {took}")
        assert len(took) == 2 and max(took.values()) <= 1.0, took
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(20)


def test_minted_credentials_close_a_tokenless_server_and_revoking_the_last_keeps_it_closed(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              credential_cache_ms=0))
    try:
        with serve(ctx) as server, httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/api/autonomy/status").status_code == 200  # none configured
            reader = mint(ctx, "dash", "read")
            assert http.get("/api/autonomy/status").status_code == 401
            assert http.get("/api/autonomy/status", headers={
                "Authorization": f"Bearer {reader}"}).status_code == 200
            credentials.revoke(ctx, name="dash", by="test")
            assert http.get("/api/autonomy/status", headers={
                "Authorization": f"Bearer {reader}"}).status_code == 403
            assert http.get("/api/autonomy/status").status_code == 401
            assert post(http, None, "create", assignee="coder", title="t").status_code == 401
    finally:
        ctx.close()


def test_a_requeue_and_a_grant_made_by_a_claim_record_the_credential(
        database_url: str, redis_server_url: str, redis_prefix: str,
        clock: FrozenClock) -> None:
    """On PostgreSQL ``autonomy_claim`` writes these events itself: they are re-stamped."""
    ctx = Context.from_settings(make_settings(database_url, redis_server_url, redis_prefix,
                                              api_token=BOOT), clock=clock)
    try:
        op = mint(ctx, "ops-alice", "operator")
        with serve(ctx) as server, httpx.Client(base_url=server.url, timeout=30) as http:
            tid = ok(post(http, op, "create", assignee="coder", title="t"))["task"]["id"]
            ok(post(http, op, "claim", assignee="coder", worker="w1"))
            clock.advance(seconds=ctx.settings.lease_ttl_s + 1)
            again = ok(post(http, op, "claim", assignee="coder", worker="w2"))
            assert again["task"]["id"] == tid and again["lease"]
            evs = [(e["kind"], e["actor"], e["actorNote"]) for e in events(http, taskId=tid)]
    finally:
        ctx.close()
    print("\n", evs)
    assert ("lease_requeued", "ops-alice", "claim:w2") in evs
    assert ("lease_granted", "ops-alice", "w2") in evs
    assert ("lease_granted", "ops-alice", "w1") in evs


def test_metrics_are_open_unless_configured_to_need_read(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_token=BOOT, metrics_require_read=True))
    try:
        reader = mint(ctx, "scraper", "read")
        worker = mint(ctx, "agent-7", "worker", lanes=["coder"])
        with serve(ctx) as server, httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/metrics").status_code == 401
            assert http.get("/metrics", headers={
                "Authorization": f"Bearer {worker}"}).status_code == 403
            got = http.get("/metrics", headers={"Authorization": f"Bearer {reader}"})
            assert got.status_code == 200 and "autonomy_secrets_redacted" in got.text
            assert http.get("/livez").status_code == 200  # the probes stay open
    finally:
        ctx.close()
