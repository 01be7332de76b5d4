"""Secrets are redacted before they are stored (SPEC 4.10): each common shape, from a
real ``autonomy worker --url --token`` process's failing command (its last stderr line is
the reason) to what the API, the history, the panel and the breaker's fingerprint show;
a result's secrets too; and the redaction is counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.ops import credentials, lanes
from app.redact import redact
from app.storage.context import Context
from tests.api_server import serve
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parent.parent
BOOT = "bootstrap-token-for-redaction-tests"
# shape -> (the stderr line, the secret in it)
SHAPES: dict[str, tuple[str, str]] = {
    "password=": ("login failed: password=hunter2-very-secret", "hunter2-very-secret"),
    "token=": ("retry with token=tok_4f9a8b7c6d5e&x=1", "tok_4f9a8b7c6d5e"),
    "bearer": ("HTTP 401 for Authorization: Bearer eyAbc123SecretBearerValue",
               "eyAbc123SecretBearerValue"),
    "url credentials": ("cannot connect to postgres://app:pg-pass-778@db.internal:5432/x",
                        "pg-pass-778"),
    "aws key id": ("AccessDenied for AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    "gcp api key": ("quota exceeded: key=AIzaSyD-1234567890abcdefghijklmnopqrstu",
                    "AIzaSyD-1234567890abcdefghijklmnopqrstu"),
    "private key": ("leaked -----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0",
                    "MIIEvQIBADANBgkqhkiG9w0"),
}
# fails the first time, with the payload's line as its last stderr line; then succeeds
COMMAND = ("import json,sys; t=json.load(sys.stdin); "
           "sys.exit(0) if t['attempts'] else (print(t['payload']['line'], file=sys.stderr), "
           "sys.exit(1))")


@pytest.fixture
def rctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                              api_token=BOOT))
    yield ctx
    ctx.close()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_secret_shape_is_redacted_by_the_pure_function(shape: str) -> None:
    line, secret = SHAPES[shape]
    out, n = redact(line)
    assert secret not in out and "[REDACTED]" in out and n >= 1, out


@pytest.mark.slow
def test_a_workers_failure_reason_is_stored_and_shown_without_its_secret(
        rctx: Context, tmp_path: Path) -> None:
    worker_secret = credentials.create(rctx, name="agent-7", scope="worker", lanes=["coder"],
                                       created_by="test")["secret"]
    reader = credentials.create(rctx, name="dash", scope="read", created_by="test")["secret"]
    ids = {shape: lanes.create(rctx, assignee="coder", title=f"shape {shape}",
                               payload={"line": line})["task"]["id"]
           for shape, (line, _) in SHAPES.items()}
    with serve(rctx) as server, httpx.Client(
            base_url=server.url, timeout=30,
            headers={"Authorization": f"Bearer {reader}"}) as http:
        env = {**os.environ, "AUTONOMY_REDIS_URL": rctx.settings.effective_redis_url,
               "AUTONOMY_REDIS_PREFIX": rctx.settings.redis_prefix}
        env.pop("AUTONOMY_API_TOKEN", None)
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "worker", "--lane", "coder", "--name", "agent-7",
             "--url", server.url, "--token", worker_secret, "--max-tasks",
             str(2 * len(SHAPES)), "--idle-max", "0.2", "--json", "--", sys.executable, "-c",
             COMMAND], env=env, cwd=REPO, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        tasks = {t["id"]: t for t in http.get("/api/autonomy/tasks",
                                              params={"limit": 500}).json()["tasks"]}
        # the payload carried the line in (the test's doing): everything else is checked
        seen = {"tasks": json.dumps([{k: v for k, v in t.items() if k != "payload"}
                                     for t in tasks.values()]),
                "panel": http.get("/").text,
                "status": http.get("/api/autonomy/status").text}
        for shape, tid in ids.items():
            hist = http.post("/api/autonomy", json={"action": "history", "taskId": tid})
            seen[f"history {shape}"] = hist.text
            assert "[REDACTED]" in (tasks[tid]["lastValidationReason"] or ""), tasks[tid]
            assert tasks[tid]["status"] == "done"
            kinds = [e["kind"] for e in hist.json()["events"]]
            assert "secrets_redacted" in kinds, kinds
        metrics = http.get("/metrics").text
    found = {shape: [where for where, text in seen.items() if secret in text]
             for shape, (_, secret) in SHAPES.items()}
    print(f"\n{'shape':<16} | worker's stderr line -> stored and shown (API, history, "
          f"panel) | fingerprint | secret seen in")
    for shape, tid in ids.items():
        print(f"{shape:<16} | {SHAPES[shape][0]!r}\n{'':<16} |   -> "
              f"{tasks[tid]['lastValidationReason']!r} | "
              f"{tasks[tid]['failureFingerprint']!r} | {', '.join(found[shape]) or 'nowhere'}")
    assert all(not where for where in found.values()), found
    counted = [ln for ln in metrics.splitlines() if ln.startswith("autonomy_secrets_redacted")]
    assert counted and float(counted[0].split()[-1]) >= len(SHAPES), counted


def test_a_results_secrets_are_redacted_and_counted(rctx: Context) -> None:
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7secretbody\n" \
          "-----END RSA PRIVATE KEY-----"
    claim_result = {"log": f"deploy ok\n{pem}\n", "password": "p@ss",
                    "steps": ["GET https://u:pw-in-url@example.com/ ok"]}
    lanes.create(rctx, assignee="coder", title="t")
    with serve(rctx) as server, httpx.Client(
            base_url=server.url, timeout=30,
            headers={"Authorization": f"Bearer {BOOT}"}) as http:
        claim = http.post("/api/autonomy", json={"action": "claim", "assignee": "coder",
                                                 "worker": "w1"}).json()
        done = http.post("/api/autonomy", json={
            "action": "complete", "taskId": claim["task"]["id"],
            "leaseToken": claim["lease"]["token"], "outcome": "success",
            "result": claim_result}).json()
        assert done["ok"], done
        stored = http.get("/api/autonomy/tasks").json()["tasks"][0]["result"]
        print(f"\nresult sent   {json.dumps(claim_result)}\nresult stored "
              f"{json.dumps(stored)}")
        assert stored == {"log": "deploy ok\n[REDACTED]\n", "password": "[REDACTED]",
                          "steps": ["GET https://u:[REDACTED]@example.com/ ok"]}
        hist = http.post("/api/autonomy", json={"action": "history",
                                                "taskId": claim["task"]["id"]}).json()
        red = [e for e in hist["events"] if e["kind"] == "secrets_redacted"]
        assert red and red[0]["data"]["count"] == 3 and red[0]["data"]["fields"] == {
            "result": 3}
    deadline = time.monotonic() + 5  # the counter lives in Redis: best effort, but there
    while rctx.redis.hget(rctx.keys.metrics(), "secrets_redacted") is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
