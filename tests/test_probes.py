"""Health probes over a real server: ``/livez`` answers from memory whatever is down;
``/readyz`` is 200 only with the database reachable at the schema head and Redis
reachable, else 503 naming what failed (Redis down is ``redis: degraded``). Redis is
stopped on a throwaway server of the test's own, never the shared one; the database is
made unreachable by pointing at a port nothing listens on. ``autonomy probe beat`` passes
for a leading and for a standing-by beat of this host, and fails when none spoke."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.clock import FrozenClock
from app.ops.probes import this_host
from app.storage import leader
from app.storage.context import Context
from tests.api_server import client
from tests.conftest import make_settings
from tests.servers import ThrowawayRedis, free_port

REPO = Path(__file__).resolve().parent.parent



def _ctx(db_url: str, redis_url: str, prefix: str, **overrides: object) -> Context:
    return Context.from_settings(make_settings(db_url, redis_url, prefix,
                                               redis_socket_timeout_s=2,
                                               db_connect_timeout_s=2, **overrides),
                                 clock=FrozenClock())


@pytest.mark.slow
def test_readyz_is_ok_with_everything_up_and_livez_echoes_pid_and_nonce(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    ctx = _ctx(sqlite_url, redis_server_url, redis_prefix, start_nonce="n-123")
    try:
        with client(ctx) as http:
            r = http.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json() == {"ok": True, "database": "ok", "redis": "ok", "failed": []}
            live = http.get("/livez")
            assert live.status_code == 200
            # longPolls: the claims waiting in this process (none here)
            assert live.json() == {"ok": True, "pid": os.getpid(), "nonce": "n-123",
                                   "longPolls": 0}
    finally:
        ctx.close()


def test_redis_stopped_readyz_503_names_redis_degraded_and_livez_still_200(
        sqlite_url: str, redis_prefix: str, own_redis: ThrowawayRedis) -> None:
    ctx = _ctx(sqlite_url, own_redis.url, redis_prefix)
    lenient = _ctx(sqlite_url, own_redis.url, redis_prefix, readyz_redis_required=False)
    try:
        with client(ctx) as http, client(lenient) as http2:
            assert http.get("/readyz").status_code == 200
            own_redis.stop()
            r = http.get("/readyz")
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["ok"] is False and body["error"] == "not_ready"
            assert body["failed"] == ["redis"] and body["redis"] == "degraded"
            assert body["database"] == "ok"
            assert body["message"].startswith("redis degraded: ")
            assert http.get("/livez").status_code == 200
            # a deployment that serves from the database alone: ready, Redis degraded
            r2 = http2.get("/readyz")
            assert r2.status_code == 200, r2.text
            assert r2.json()["redis"] == "degraded" and r2.json()["failed"] == []
    finally:
        ctx.close()
        lenient.close()


def test_database_unreachable_readyz_503_names_the_database_and_livez_still_200(
        redis_server_url: str, redis_prefix: str) -> None:
    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    ctx = _ctx(nowhere, redis_server_url, redis_prefix)
    try:
        with client(ctx) as http:
            r = http.get("/readyz")
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["failed"] == ["database"] and body["database"] == "unreachable"
            assert body["redis"] == "ok"
            assert body["message"].startswith("database unreachable: ")
            assert http.get("/livez").status_code == 200
    finally:
        ctx.close()


def test_an_unmigrated_database_is_not_ready(tmp_path: Path, redis_server_url: str,
                                             redis_prefix: str) -> None:
    ctx = _ctx(f"sqlite:///{tmp_path / 'empty.db'}", redis_server_url, redis_prefix)
    try:
        with client(ctx) as http:
            r = http.get("/readyz")
            assert r.status_code == 503
            body = r.json()
            assert body["database"] == "not_migrated" and body["failed"] == ["database"]
            assert body["schema"]["current"] is None and body["schema"]["head"]
            assert "autonomy db upgrade" in body["message"]
    finally:
        ctx.close()


def _probe(args: list[str], env: dict[str, str]) -> tuple[int, dict[str, object]]:
    out = subprocess.run([sys.executable, "-m", "app.cli", "probe", *args, "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_beat_probe_passes_for_a_leader_and_a_standby_of_this_host_and_fails_otherwise(
        sqlite_url: str, redis_server_url: str, redis_prefix: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
    env.update(DATABASE_URL=sqlite_url, REDIS_URL=redis_server_url,
               AUTONOMY_REDIS_PREFIX=redis_prefix)
    ctx = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix))
    try:
        code, answer = _probe(["beat"], env)
        assert code == 1 and answer["ok"] is False and answer["error"] == "beat_silent"
        token, _ = leader.acquire(ctx, f"{this_host()}111:beat")
        assert token is not None
        code, answer = _probe(["beat"], env)
        assert code == 0 and answer["role"] == "leader"
        leader.release(ctx, token)
        leader.acquire(ctx, "other-host:1:beat")
        leader.stand_by(ctx, f"{this_host()}222:beat")
        code, answer = _probe(["beat"], env)
        assert code == 0 and answer["role"] == "standby"
        code, answer = _probe(["beat", "--holder-prefix", "third-host:"], env)
        assert code == 1
        code, answer = _probe(["ready"], env)
        assert code == 0 and answer["ok"] is True
    finally:
        ctx.close()


def test_compose_and_the_image_probe_through_readyz_ping_and_the_beat_lease() -> None:
    compose = (REPO / "compose.yaml").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    parts = re.split(r"^  ([a-z]+):$", compose, flags=re.M)
    services = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert "/readyz" in services["api"] and "/api/autonomy/status" not in services["api"]
    assert "inspect ping" in services["worker"]
    assert '"autonomy", "probe", "beat"' in services["beat"]
    assert "celerybeat-schedule*" not in services["beat"]  # a standby never writes it
    assert "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile
