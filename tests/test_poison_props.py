"""Property tests (Hypothesis) for SPEC 4.8: every action, every string field, arbitrary
Unicode including lone surrogates and NUL, and deep nesting (as objects and as JSON
strings) -- over HTTP and over the CLI. Never a 5xx, never a traceback; and afterwards the
database is readable in full (tasks, status, history all 200), so nothing accepted was
unanswerable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from app.storage import db
from app.storage.context import Context
from tests.api_server import client
from tests.conftest import make_settings

TOKEN = "props-token"
SEED = int(os.environ.get("AUTONOMY_FUZZ_SEED", "20251130"))
LANES = ["coder", "b", "ops"]

# one character: anything Hypothesis draws, a lone surrogate, or NUL
char = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.just("\x00"))
poison = st.lists(char, max_size=12).map("".join)
# valid but unusual text (emoji, RTL, combining marks...): accepted, stored, answered
clean = st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=30)
text = st.one_of(clean, clean, st.text(max_size=30), poison,
                 st.sampled_from([*LANES, "w1", "a b", ""]))
name = st.one_of(st.sampled_from(LANES), st.sampled_from(LANES), st.sampled_from(LANES), text)
actor = st.one_of(st.none(), st.sampled_from(["w1", "ops:1"]), text)


class Deep:
    """A payload nested ``n`` deep, spliced into the body as text (so the test's own
    encoder never recurses on it)."""

    def __init__(self, n: int, as_string: bool) -> None:
        self.n, self.as_string = n, as_string

    def text(self) -> str:
        raw = '{"k": ' + "[" * self.n + "]" * self.n + "}"
        return json.dumps(raw) if self.as_string else raw


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), text),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(text, inner, max_size=3)),
    max_leaves=12)
payload = st.one_of(
    st.none(), st.none(), st.none(),
    st.dictionaries(clean, json_value, max_size=4),
    st.dictionaries(text, json_value, max_size=4),
    st.dictionaries(text, json_value, max_size=3).map(json.dumps),  # a string holding JSON
    st.builds(Deep, st.integers(1, 3000), st.booleans()),
    text)
task_id = st.one_of(st.integers(1, 5), st.integers(), text)
token = st.one_of(st.just("0" * 32), text)

ACTIONS = {
    "create": {"assignee": name, "title": text, "payload": payload, "actor": actor,
               "priority": st.one_of(st.none(), st.integers(-5, 5))},
    "claim": {"assignee": name, "worker": text},
    "heartbeat": {"taskId": task_id, "leaseToken": token},
    "complete": {"taskId": task_id, "leaseToken": token,
                 "outcome": st.one_of(st.sampled_from(["success", "failure"]), text),
                 "validationReason": text, "result": payload, "actor": actor},
    "release": {"taskId": task_id, "leaseToken": token, "actor": actor},
    "pause_lane": {"assignee": name, "reason": text, "actor": actor},
    "resume_lane": {"assignee": name, "reason": text, "actor": actor},
    "configure_lane": {"assignee": name, "maxInFlight": st.integers(0, 3), "actor": actor},
    "fingerprint_count": {"fingerprint": text, "windowHours": st.one_of(st.none(),
                                                                       st.floats())},
    "history": {"taskId": st.one_of(st.none(), task_id), "assignee": st.one_of(st.none(),
                                                                               name)},
    "status": {},
    "ops_incident": {"status": st.one_of(st.sampled_from(["ok", "warning"]), text),
                     "reason": text, "actor": actor},
}


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    action = draw(st.one_of(*(st.just(a) for a in sorted(ACTIONS)), text))
    fields = ACTIONS.get(action, {})
    body: dict[str, Any] = {"action": action}
    for field, strategy in fields.items():
        if draw(st.booleans()) or field in ("assignee", "title", "taskId", "leaseToken"):
            body[field] = draw(strategy)
    return body


def encode(body: dict[str, Any]) -> bytes:
    """JSON with ``\\u`` escapes (lone surrogates travel as escapes), deep payloads spliced."""
    deep = {k: v for k, v in body.items() if isinstance(v, Deep)}
    plain = {k: (f"@@{k}@@" if k in deep else v) for k, v in body.items()}
    out = json.dumps(plain, allow_nan=True)
    for k, v in deep.items():
        out = out.replace(json.dumps(f"@@{k}@@"), v.text())
    return out.encode()


@pytest.fixture
def pctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_token=TOKEN))
    yield ctx
    ctx.close()


def readable_in_full(http: httpx.Client) -> None:
    tasks = http.get("/api/autonomy/tasks", params={"limit": 500})
    assert tasks.status_code == 200, tasks.text
    assert http.get("/api/autonomy/status").status_code == 200
    assert http.get("/").status_code == 200
    lanes = {t["assignee"] for t in tasks.json()["tasks"]} | set(LANES)
    for lane in lanes:
        resp = http.post("/api/autonomy", json={"action": "history", "assignee": lane})
        assert resp.status_code == 200, resp.text
    for t in tasks.json()["tasks"]:
        resp = http.post("/api/autonomy", json={"action": "history", "taskId": t["id"]})
        assert resp.status_code == 200, resp.text


@pytest.mark.slow
def test_any_request_over_http_is_answered_below_500_and_the_db_stays_readable(
        pctx: Context) -> None:
    statuses: dict[int, int] = {}
    with client(pctx, TOKEN) as http:

        @seed(SEED)
        @settings(max_examples=600, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=requests())
        def run(body: dict[str, Any]) -> None:
            resp = http.post("/api/autonomy", content=encode(body),
                             headers={"Content-Type": "application/json"})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (body, resp.text)
            answer = resp.json()
            assert isinstance(answer, dict) and "ok" in answer, resp.text
            if resp.status_code == 400 and answer["error"] == "invalid_input":
                assert answer["message"]

        run()
        print("statuses:", dict(sorted(statuses.items())))
        assert statuses.get(200, 0) > 40 and statuses.get(400, 0) > 100, statuses
        readable_in_full(http)


# --- the CLI ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
argv_text = st.lists(st.one_of(st.characters(exclude_characters="\x00"),
                               st.integers(0xD800, 0xDFFF).map(chr)),
                     max_size=10).map("".join)
cli_text = st.one_of(argv_text, st.sampled_from(LANES), st.sampled_from(LANES),
                     clean.filter(lambda s: "\x00" not in s and not s.startswith("-")),
                     poison.map(lambda s: json.dumps({"k": s})),
                     st.integers(1, 3000).map(lambda n: '{"k": ' + "[" * n + "]" * n + "}"))


@st.composite
def commands(draw: Any) -> list[str]:
    a, b = draw(cli_text), draw(cli_text)
    return draw(st.sampled_from([
        ["create", a, b], ["create", "coder", "t", "--payload", a],
        ["create", "coder", a, "--priority", b],
        ["claim", a, b], ["pause", a, "--reason", b], ["resume", a, "--actor", b],
        ["lane", a, "--max-in-flight", b], ["fingerprints", a], ["history", "--lane", a],
        ["history", "--task", a], ["complete", "1", a, "--outcome", "failure",
                                   "--reason", b],
        ["complete", "1", "0" * 32, "--result", a], ["release", a, b],
    ]))


def _arg(s: str) -> bytes:
    # lone surrogates become bytes that are not UTF-8, as a hostile argv would hold
    return s.encode("utf-8", "surrogatepass")


@pytest.mark.slow
def test_any_cli_input_exits_cleanly_and_the_db_stays_readable(pctx: Context,
                                                                tmp_path: Path) -> None:
    s = pctx.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
    env.update(AUTONOMY_DATABASE_URL=s.database_url, AUTONOMY_REDIS_URL=s.effective_redis_url,
               AUTONOMY_REDIS_PREFIX=s.redis_prefix)
    codes: dict[int, int] = {}

    @seed(SEED)
    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(argv=commands())
    @example(argv=["create", "coder", "héllo 🌍 مرحبا"])  # accepted unusual text, as anchors
    @example(argv=["create", "coder", "t", "--payload", '{"k": ["ü", {"\u00e9": 1}]}'])
    @example(argv=["pause", "coder", "--reason", "why ✓"])
    @example(argv=["history", "--lane", "coder"])
    def run(argv: list[str]) -> None:
        proc = subprocess.run([sys.executable.encode(), b"-m", b"app.cli",
                               *[_arg(x) for x in argv], b"--json"],
                              env=env, cwd=REPO, capture_output=True, timeout=60)
        err = proc.stderr.decode("utf-8", "replace")
        codes[proc.returncode] = codes.get(proc.returncode, 0) + 1
        assert "Traceback" not in err, (argv, err)
        assert proc.returncode in (0, 1, 2), (argv, proc.returncode, err)
        if proc.returncode == 2:
            assert "error: invalid" in err, (argv, err)
        if proc.returncode != 0:
            assert err.strip().splitlines()[-1].startswith("error: "), (argv, err)

    run()
    print("exit codes:", dict(sorted(codes.items())))
    assert codes.get(2, 0) > 5 and codes.get(0, 0) > 3, codes
    db.upgrade(s.database_url)  # a no-op: the schema is as it was
    with client(pctx, TOKEN) as http:
        readable_in_full(http)
