"""The fault suite (issue 9, SPEC 4.7): real faults injected into real processes.

Per backend (SQLite, PostgreSQL) one stack (``stack.py``): a Redis and a database the
suite owns, 8 ``autonomy worker`` processes on 4 lanes whose command appends its task id to
a log, a Celery worker and two beats. Each fault gets a run of its own: a fresh batch of
tasks, the fault injected once a quarter of them are done, then the batch drained and
measured from the database, the event log and the command log. One table is printed (and
written to ``test-output/faults-table.md``).

Each test is one stack and a list of rows (``_survive(backend, [(row, fault), ...])``); a
fault function injects its fault into the running stack and says when it ended.

Scaled to fit a small CI machine (settings, not code paths): ``FAULT_TASKS`` tasks per
run (default 200, the issue's figure is 2,000 for the whole drain), leases of 6 s (50 s in
the PostgreSQL-outage run, which stops the database for 40 s), run-lock heartbeats of
0.5 s and a 2.5 s dead-after, beat sending every job every second.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis

from app.celery_watchdog import EXIT_STUCK
from app.ops.checks import status
from app.storage import db
from app.storage.context import Context
from tests.faults.stack import (
    LANES,
    MAX_IN_FLIGHT,
    Postgres,
    Row,
    Stack,
    measure,
    table,
    until,
)
from tests.servers import ThrowawayRedis, free_port, non_loopback_address

pytestmark = [pytest.mark.slow, pytest.mark.fault]

TASKS = int(os.environ.get("FAULT_TASKS", "200"))
LEASE_S = 6.0
PG_OUTAGE_S = 40.0
PG_LEASE_S = 50.0
ROWS: list[Row] = []
OUT = Path(__file__).resolve().parents[2] / "test-output" / "faults-table.md"

# a fault: injects itself into the running stack; answers when Redis misbehaved (or a label
# for the "done during outage" cell, or None), when the fault ended, and notes for the row
Outage = tuple[datetime, datetime] | str | None
Inject = Callable[[Stack], tuple[Outage, datetime, str]]


def _now() -> datetime:
    return datetime.now(UTC)


def _run(stack: Stack, fault: str, inject: Inject) -> Row:
    until("a beat to lead", lambda: stack.beat_leader() is not None, 90)
    since = _now()
    ids = stack.seed(TASKS, fault)  # stack.batch: a fault may add tasks of its own to it
    until(f"{fault}: a quarter of the batch done",
          lambda: stack.safe_done_count(ids) >= TASKS // 4, 180)
    before = stack.beat_leader()
    outage, fault_end, notes = inject(stack)
    until(f"{fault}: the whole batch done",
          lambda: stack.safe_done_count(ids) == len(ids), 240)
    until(f"{fault}: beat sends jobs again", lambda: stack.beat_sends_since(fault_end) >= 4, 90)
    notes += beats_back(stack)
    beats = [b for b in ("beat1", "beat2") if stack.procs[b].popen.poll() is None]
    notes += f"; leader {before} -> {stack.beat_leader()}; beats alive: {len(beats)}/2"
    row = measure(stack, fault, ids, since=since, outage=outage, fault_end=fault_end,
                  notes=notes)
    ROWS.append(row)
    return row


# --- the faults ----------------------------------------------------------------------------


# Two known Celery/kombu bugs after the broker's Redis restarts or stalls:
# - the consumer stops taking messages for good ("Pool callback raised exception" in its
#   log, celery#10205, kombu#2007) while the process lives on; the worker's consumer
#   watchdog (``app.celery_watchdog``, 8 s here) then stops it with exit code 70;
# - closing the lost connection with messages unacked raised ``AttributeError: 'NoneType'
#   object has no attribute 'hostname'`` inside kombu 5.7 and Celery exited 1 with
#   "Unrecoverable error" (on every ``kill -9`` of Redis here); ``app.celery_broker``
#   fixes that, and the notes would show it coming back.
# Either way the process exits and its supervisor (compose's restart policy, Kubernetes,
# ``autonomy up``) starts a fresh one; the suite restarts it the same way and says which
# in the row's notes, so the table shows every time it happened. A worker that lives on
# and runs no job is the failure: that is what the watchdog is for.
KOMBU_STUCK = "Pool callback raised exception"
CELERY_CRASH = "Unrecoverable error"


def celery_consumes_again(stack: Stack, wait_s: float = 60) -> str:
    """Wait for the Celery worker to run a check job again after a Redis fault; if it
    exited (its watchdog stopped it, or it crashed), restart it as a supervisor would and
    say so."""
    def running() -> bool:
        return stack.lock_holder_pid("handoff_health") is not None

    celery = stack.procs["celery"]
    start = time.monotonic()
    while time.monotonic() - start < wait_s:
        if running():
            return ""
        if celery.popen.poll() is not None:
            break
        time.sleep(0.1)
    log = (stack.tmp / "celery.log").read_text(errors="replace")
    kombu = " (the kombu symptom in its log)" if KOMBU_STUCK in log else ""
    code = celery.popen.poll()
    assert code is not None, (
        f"the Celery worker runs no job {wait_s:.0f} s after the fault and its watchdog did "
        f"not stop it{kombu}")
    if code == EXIT_STUCK:
        assert "consumer watchdog" in log
        why = f"stuck{kombu}: its watchdog stopped it (exit {EXIT_STUCK})"
    else:
        assert code != 0, "the Celery worker exited 0 after the fault: nothing asked it to"
        crash = [ln for ln in log.splitlines() if CELERY_CRASH in ln]
        assert crash, f"the Celery worker exited {code} with no {CELERY_CRASH!r} in its log"
        error = crash[-1].split(CELERY_CRASH, 1)[1].strip(": ").split("  ")[0][:90]
        why = f"crashed (exit {code}, {CELERY_CRASH}: {error})"
    stack.restart("celery")
    until("the restarted Celery worker to run a check job", running, 90)
    return f"; celery worker {why} after the Redis fault, restarted as its supervisor would"


LEASE_LOST = "beat lease taken by another beat"
LEADS = ": this beat leads"


def beats_back(stack: Stack) -> str:
    """A beat whose leader lease another beat took stops itself, by design (SPEC 4.7: two
    beats never send at once for longer than a renewal; its supervisor starts it again as
    a standby). A Redis that drops the lease (evicts it: full under ``volatile-*`` or
    ``allkeys-*``) can hand it to the standby. Restart such a beat as its supervisor
    would, and say so; a beat that exited for any other reason fails the row."""
    def settled(b: str) -> bool:
        """``b`` leads, never led, or has said it lost its lease (a lease taken from a
        leader is seen at its next renewal: wait for that, not the next row)."""
        lines = stack.procs[b].lines()
        return (stack.beat_leader() == b or LEADS not in lines
                or LEASE_LOST in lines.split(LEADS)[-1])

    until("each beat to lead, stand by, or say it lost its lease",
          lambda: all(settled(b) for b in ("beat1", "beat2")), 30)
    notes = ""
    for b in ("beat1", "beat2"):
        proc = stack.procs[b]
        if LEASE_LOST not in proc.lines():
            assert proc.popen.poll() is None, f"{b} exited {proc.popen.poll()}"
            continue
        code = proc.popen.wait(60)
        stack.restart(b)
        until(f"{b} to stand by", lambda b=b: "stands by" in stack.procs[b].lines(), 60)
        notes += (f"; {b} lost its lease to the other beat, stopped itself (exit {code}) as "
                  "designed, restarted as its supervisor would: stands by")
    return notes


def redis_kill_restart(stack: Stack) -> tuple[tuple[datetime, datetime], datetime, str]:
    """kill -9 Redis; 3 s later an empty one on the same port."""
    t0 = _now()
    stack.redis.kill()
    time.sleep(3.0)  # the outage itself
    stack.redis.restart()
    t1 = _now()
    took = until("a beat to lead again", lambda: stack.beat_leader() is not None, 60)
    stuck = celery_consumes_again(stack)
    return (t0, t1), t1, f"outage 3 s; a beat leads {took:.1f}s after Redis is back{stuck}"


def redis_sigstop(stack: Stack) -> tuple[tuple[datetime, datetime], datetime, str]:
    """SIGSTOP Redis past the lease TTL and the claim-reserve time, then SIGCONT."""
    stall_s = LEASE_S + stack.ctx.settings.claim_reserve_ms / 1000 + 1
    t0 = _now()
    os.kill(stack.redis.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(stall_s)  # the stall itself
    finally:
        os.kill(stack.redis.proc.pid, signal.SIGCONT)
    t1 = _now()
    until("a beat to lead", lambda: stack.beat_leader() is not None, 60)
    stuck = celery_consumes_again(stack)
    return (t0, t1), t1, f"stalled {stall_s:g} s{stuck}"


REFUSAL_S = 8.0
REFUSAL_PASSWORD = "fault-suite-password"


def _admin(stack: Stack) -> redis.Redis:
    """A connection of the suite's own to its Redis, opened before any refusal (so it
    stays authenticated when a password is required)."""
    return redis.Redis(host="127.0.0.1", port=stack.redis.port)


def _refusing(stack: Stack, what: str, refuse: Callable[[redis.Redis], None],
              fix: Callable[[redis.Redis], str | None],
              during: Callable[[], str] | None = None
              ) -> tuple[tuple[datetime, datetime], datetime, str]:
    """``refuse`` for ``REFUSAL_S`` (``during`` looks at the fleet meanwhile: its note
    joins the row's), then ``fix`` (its answer too)."""
    a = _admin(stack)
    a.ping()
    t0 = _now()
    start = time.monotonic()
    refuse(a)
    seen = ""
    try:
        if during is not None:
            seen = "; " + during()
        time.sleep(max(0.0, REFUSAL_S - (time.monotonic() - start)))  # the fault itself
    finally:
        fixed = fix(a)
        a.close()
    t1 = _now()
    took = until("a beat to lead", lambda: stack.beat_leader() is not None, 60)
    stuck = celery_consumes_again(stack)
    return (t0, t1), t1, (f"{what} {REFUSAL_S:g} s{seen}" + (f"; {fixed}" if fixed else "")
                          + f"; a beat leads {took:.1f}s after Redis is fixed{stuck}")


def redis_full(stack: Stack) -> tuple[tuple[datetime, datetime], datetime, str]:
    """Under ``noeviction``, ``maxmemory`` set below what Redis holds (as a Redis filled
    by another app): every write answers OOM; then room again."""
    def refuse(a: redis.Redis) -> None:
        a.config_set("maxmemory-policy", "noeviction")
        a.config_set("maxmemory", str(max(1, int(a.info("memory")["used_memory"]) // 2)))

    def fix(a: redis.Redis) -> None:
        a.config_set("maxmemory", "0")

    return _refusing(stack, "OOM on every write", refuse, fix)


def redis_read_only(stack: Stack) -> tuple[tuple[datetime, datetime], datetime, str]:
    """Redis turned into a replica of a master that is gone (a failover the fleet's URL
    did not follow): every write answers READONLY; then promoted again."""
    def fix(a: redis.Redis) -> None:
        a.execute_command("REPLICAOF", "NO", "ONE")

    return _refusing(
        stack, "READONLY replica", lambda a: a.execute_command(
            "REPLICAOF", "127.0.0.1", str(free_port())), fix)


def redis_password(stack: Stack) -> tuple[tuple[datetime, datetime], datetime, str]:
    """A password required and every connection dropped: each reconnect answers NOAUTH;
    then the requirement lifted (fixed)."""
    def refuse(a: redis.Redis) -> None:
        a.config_set("requirepass", REFUSAL_PASSWORD)
        a.client_kill_filter(_type="normal", skipme=True)

    def fix(a: redis.Redis) -> None:
        a.config_set("requirepass", "")

    return _refusing(stack, "NOAUTH (password required)", refuse, fix)


OTHER_APP_DB = 1  # another app's keys live in a database of their own on the same Redis
OTHER_APP_VALUE = b"x" * 16384
OTHER_APP_HEADROOM = 2 * 1024 * 1024


class OtherApp:
    """Another app sharing the fleet's Redis: it writes keys of its own (16 KiB values,
    each with a TTL when ``ttl_s``) as fast as it can, about 6 MB/s, until ``stop()``."""

    def __init__(self, stack: Stack, ttl_s: int | None) -> None:
        self.client = redis.Redis(host="127.0.0.1", port=stack.redis.port, db=OTHER_APP_DB)
        self.ttl_s, self.written, self.refused = ttl_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="other-app", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        n = 0
        while not self._stop.wait(0.05):
            pipe = self.client.pipeline(transaction=False)
            for _ in range(20):
                n += 1
                pipe.set(f"other-app:{n}", OTHER_APP_VALUE, ex=self.ttl_s)
            try:
                pipe.execute()
                self.written += 20
            except redis.RedisError:
                self.refused += 20

    def stop(self) -> str:
        """Stop writing, drop the app's keys; says what it wrote."""
        self._stop.set()
        self._thread.join(10)
        self.client.flushdb()
        self.client.close()
        return f"the other app wrote {self.written} keys of 16 KiB ({self.refused} refused)"


def _evicting(stack: Stack, policy: str, ttl_s: int | None,
              during: Callable[[], str] | None = None
              ) -> tuple[tuple[datetime, datetime], datetime, str]:
    """``maxmemory-policy`` ``policy`` with ``maxmemory`` 2 MB over what Redis holds, and
    another app pressing on it: Redis stays full and evicts, by its policy, to take each
    write; then no limit, ``noeviction`` again, the other app gone."""
    app: list[OtherApp] = []
    evicted: list[int] = []
    t0 = _now()

    def refuse(a: redis.Redis) -> None:
        evicted.append(int(a.info("stats")["evicted_keys"]))
        a.config_set("maxmemory-policy", policy)
        a.config_set("maxmemory", str(int(a.info("memory")["used_memory"])
                                      + OTHER_APP_HEADROOM))
        app.append(OtherApp(stack, ttl_s))
        until("Redis to evict", lambda: int(a.info("stats")["evicted_keys"]) > evicted[0], 20)

    def fix(a: redis.Redis) -> str:
        wrote = app[0].stop() if app else "the other app did not start"
        gone = int(a.info("stats")["evicted_keys"]) - evicted[0]
        a.config_set("maxmemory", "0")
        a.config_set("maxmemory-policy", "noeviction")
        # a run whose run-lock was evicted under it (and maybe taken by the next run)
        # finds it gone at its heartbeat or its record: refused, an event
        fenced = len(stack.events(kind="run_lock_fenced", since=t0))
        return f"{wrote}; Redis evicted {gone} keys; job runs fenced: {fenced}"

    return _refusing(stack, f"full and evicting ({policy})", refuse, fix, during)


def redis_full_volatile(stack: Stack) -> tuple[tuple[datetime, datetime], datetime, str]:
    """``volatile-lru``, full: another app's keys (each with a TTL) fill ``maxmemory``
    and keep coming. Redis evicts keys that have a TTL -- the other app's, and maybe the
    fleet's run-locks and leases, which carry theirs -- to take each write."""
    return _evicting(stack, "volatile-lru", ttl_s=3600)


def redis_evicting(stack: Stack) -> tuple[tuple[datetime, datetime], datetime, str]:
    """``allkeys-lru``, full: another app's keys (no TTL) keep coming, and Redis evicts
    any key to take them, run-locks and leases included. The fencing holds (no two runs
    of a job recorded at once), and status names the policy (SPEC 4.7)."""
    def named() -> str:
        # a fresh context: a running process reads the policy again within POLICY_TTL_S
        ctx = Context.from_settings(stack.settings())
        try:
            def says() -> bool:
                memory = status.build_status(ctx).get("redisMemory") or {}
                return (memory.get("maxmemoryPolicy") == "allkeys-lru"
                        and bool(memory.get("evictsFleetKeys"))
                        and "allkeys-lru" in str(memory.get("warning")))
            until("status to name the allkeys-lru policy", says, 20)
        finally:
            ctx.close()
        return "status names allkeys-lru (evictsFleetKeys, a warning)"

    return _evicting(stack, "allkeys-lru", ttl_s=None, during=named)


def kill_workers(stack: Stack) -> tuple[None, datetime, str]:
    """kill -9 of 3 random lane workers (mid-task where they hold one); 3 new ones start."""
    victims = random.sample(stack.workers(), 3)
    for v in victims:
        v.popen.kill()
    for v in victims:
        v.popen.wait(10)
    for i, v in enumerate(victims):
        lane = next(ln for ln in LANES if f"-{ln}-" in v.name)
        stack.start_worker(f"{v.name}-r{i}", lane,
                           ["sh", "-c", f'cat >/dev/null; echo "$AUTONOMY_TASK_ID '
                                        f'$AUTONOMY_WORKER" >> {stack.cmd_log}'])
    t = _now()
    return None, t, "killed " + ", ".join(v.name for v in victims)


def kill_beat_and_celery_child(stack: Stack) -> tuple[None, datetime, str]:
    """kill -9 of the leading beat, and of the Celery pool process running a job."""
    until("a beat to lead", lambda: stack.beat_leader() is not None, 60)
    leader = stack.beat_leader()
    assert leader is not None
    _, job_pid = stack.a_run_holding("handoff_health", 60)
    stack.procs[leader].popen.kill()
    stack.procs[leader].popen.wait(10)
    os.kill(job_pid, signal.SIGKILL)
    t = _now()
    other = "beat2" if leader == "beat1" else "beat1"
    took = until(f"{other} to take over", lambda: stack.beat_leader() == other, 60)
    stack.restart(leader)  # back as the standby: exactly one leads
    until(f"{leader} to stand by", lambda: "stands by" in (stack.tmp / f"{leader}.log")
          .read_text(errors="replace").split("beat lease taken by")[-1], 60)
    assert stack.beat_leader() == other
    return None, t, (f"killed {leader} and pool pid {job_pid} mid-job; {other} led after "
                     f"{took:.1f}s; {leader} restarted stands by")


def sigstop_lock_holder(stack: Stack) -> tuple[None, datetime, str]:
    """SIGSTOP the process holding a job's run-lock past its dead-after time; self-heal
    breaks the lock; SIGCONT: its writes must be refused (fenced)."""
    start, in_sqlite_write, ended = _now(), [], 0
    for _attempt in range(8):
        holder, pid = stack.a_run_holding("handoff_health", 60)
        t0 = _now()
        os.kill(pid, signal.SIGSTOP)
        until(f"pid {pid} to stop", lambda pid=pid: stack.stopped(pid), 10)
        if stack.lock_holder("handoff_health") != (holder, pid):
            # the run let its lock go between the look and the stop: stop a later one
            os.kill(pid, signal.SIGCONT)
            ended += 1
            continue
        held = stack.sqlite_write_locks(pid)
        if held:
            # stopped inside a write transaction (the job's check writes its snapshot):
            # SQLite has one writer, so no process could write until SIGCONT, self-heal
            # included. That is SQLite's fault, not this row's: stop a later run instead
            os.kill(pid, signal.SIGCONT)
            in_sqlite_write.append(f"pid {pid} held {', '.join(held)}")
            continue
        try:
            until("self-heal to break the stopped holder's lock", lambda t0=t0: any(
                e["data"].get("job") == "handoff_health"
                for e in stack.events(kind="run_lock_broken", since=t0)), 60)
        finally:
            os.kill(pid, signal.SIGCONT)
        try:
            until("the stopped run's write to be fenced",
                  lambda t0=t0: bool(stack.events(kind="run_lock_fenced", since=t0)), 20)
            break
        except AssertionError:
            continue  # it was stopped after its last write: try again
    fenced = stack.events(kind="run_lock_fenced", since=start)
    assert fenced, ("no fenced write after 8 stopped holders; stopped inside SQLite's write "
                    f"transaction and let go: {in_sqlite_write}; stopped after the run "
                    f"ended: {ended}")
    t = _now()
    return None, t, (f"stopped pid {pid}; lock broken by self-heal; fenced writes refused: "
                     + ", ".join(sorted({str(e['data'].get('refused')) for e in fenced}))
                     + (f"; {len(in_sqlite_write)} stop(s) inside SQLite's write transaction"
                        " let go first" if in_sqlite_write else ""))


REDIS7 = "/usr/bin/redis-server"
LOADING_KEYS = 60_000  # another app's keys in the dump Redis is restarted on
LOADING_DELAY_US = 250  # Redis 7's key-load-delay: each key read that much slower (~20 s)
START_CREATES = 8  # tasks created through the API while Redis refuses


def _serves(stack: Stack) -> bool:
    """Does Redis serve a client that reaches it as the fleet does?"""
    c = redis.Redis.from_url(stack.fleet_redis_url, socket_timeout=2)
    try:
        return bool(c.ping())
    except redis.RedisError:
        return False
    finally:
        c.close()


class Reloads:
    """While the fleet has not yet met Redis loading (``until.set()`` not called), each
    time Redis is done loading it loads its dump again (``DEBUG RELOAD``): LOADING again.
    ``count``: how many times."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.count, self.until = stack, 0, threading.Event()
        self.thread = threading.Thread(target=self._reload, name="debug-reload", daemon=True)
        self.thread.start()

    def _reload(self) -> None:
        c = redis.Redis(host="127.0.0.1", port=self.stack.redis.port)
        try:
            while not self.until.wait(0.1):
                if _serves(self.stack):
                    c.execute_command("DEBUG", "RELOAD")
                    self.count += 1
        finally:
            c.close()

    def stop(self) -> None:
        self.until.set()
        self.thread.join(120)


def _meet_the_starting_fleet(stack: Stack, http: httpx.Client, done_before: int,
                             kind: str) -> str:
    """While Redis refuses (``kind``), as the fleet starts: the API answers (creates
    ``START_CREATES`` tasks, added to the batch; nothing 5xx but ``/readyz``'s 503 naming
    Redis), tasks are done from the database, and each beat says it cannot lead."""
    answers: list[str] = []
    created: list[int] = []
    ready_503 = 0

    def met() -> bool:
        nonlocal ready_503
        try:
            r = http.get("/readyz")
        except httpx.TransportError:
            return False  # not serving yet
        answers.append(f"/readyz {r.status_code}")
        assert r.status_code in (200, 503), f"/readyz answered {r.status_code}: {r.text}"
        if r.status_code == 503:
            assert "redis" in r.json().get("failed", []), r.text
            ready_503 += 1
        while len(created) < START_CREATES:
            lane = LANES[len(created) % len(LANES)]
            made = http.post("/api/autonomy", json={"action": "create", "assignee": lane,
                                                    "title": f"{kind} start {len(created)}"})
            answers.append(f"create {made.status_code}")
            assert made.status_code == 200, f"create answered {made.status_code}: {made.text}"
            created.append(int(made.json()["task"]["id"]))
            stack.batch.append(created[-1])
        st = http.get("/api/autonomy/status")
        answers.append(f"status {st.status_code}")
        assert st.status_code == 200, f"status answered {st.status_code}: {st.text}"
        beats_say = all("cannot lead" in (stack.tmp / f"{b}.log").read_text(errors="replace")
                        for b in ("beat1", "beat2"))
        return (ready_503 > 0 and st.json()["redis"] == "degraded" and beats_say
                and stack.safe_done_count(stack.batch) > done_before)

    took = until(f"the fleet to start against a Redis answering {kind}", met, 120)
    others = sorted({a for a in answers if a.split()[-1] not in ("200", "503")})
    assert not others, f"the API answered {others} while Redis answered {kind}"
    return (f"API, celery, 2 beats, 8 workers started on it: {len(created)} creates 200, "
            f"/readyz 503 naming redis x{ready_503}, status 200 degraded, beats say they "
            f"cannot lead, tasks done ({took:.0f}s)")


def redis_refusing_at_start(kind: str) -> Inject:
    """Every process stopped; Redis made to answer ``kind`` -- ``DENIED`` (protected mode
    on: the fleet reaches it by this machine's address, not loopback) or ``LOADING``
    (restarted on a dump with another app's keys, read slowly: ``key-load-delay``); the
    API, the Celery worker, both beats and the lane workers started against it; then
    Redis serves (protected mode off; the dump loaded)."""
    def inject(stack: Stack) -> tuple[tuple[datetime, datetime], datetime, str]:
        stack.stop_all()
        done_before = stack.done_count(stack.batch)
        a = _admin(stack)
        t0 = _now()
        if kind == "DENIED":
            a.config_set("protected-mode", "yes")
        else:
            other = redis.Redis(host="127.0.0.1", port=stack.redis.port, db=OTHER_APP_DB)
            other.execute_command("DEBUG", "POPULATE", LOADING_KEYS, "other-app", 64)
            other.close()
            a.save()
            a.close()
            # each key read slower, and clients answered (LOADING) every KiB read
            stack.redis.restart("--key-load-delay", str(LOADING_DELAY_US),
                                "--loading-process-events-interval-bytes", "1024",
                                loading=True)
            a = _admin(stack)
        assert not _serves(stack), f"Redis does not answer {kind}"
        reloads = Reloads(stack) if kind == "LOADING" else None
        stack.start_celery()
        stack.start_api()
        stack.start_workers()
        try:
            with httpx.Client(base_url=stack.api_url, timeout=30) as http:
                seen = _meet_the_starting_fleet(stack, http, done_before, kind)
                if reloads is not None:
                    reloads.stop()
                    seen += f"; loaded again (DEBUG RELOAD) {reloads.count} times"
                else:
                    a.config_set("protected-mode", "no")
                until("Redis to serve the fleet", lambda: _serves(stack), 120)
                t1 = _now()
                took = until("a beat to lead", lambda: stack.beat_leader() is not None, 60)
                stuck = celery_consumes_again(stack)
                until("/readyz to answer 200",
                      lambda: http.get("/readyz").status_code == 200, 60)
        finally:
            if reloads is not None:
                reloads.stop()
            if kind == "DENIED":
                a.config_set("protected-mode", "no")
            a.close()
        return (t0, t1), t1, (f"{kind} from the start: {seen}; a beat leads {took:.1f}s "
                              f"after Redis serves{stuck}; /readyz 200")
    return inject


SKEW_S = 600.0
SKEW_WORK_S = 0.2  # each task holds its lease a while, so skewed claims meet live leases


def skewed_workers(offset_s: float) -> Inject:
    """One more worker per lane whose wall clock reads ``offset_s`` seconds off (SPEC
    4.9): it must neither take an honest lease early (ahead) nor lose its own (behind)."""
    def inject(stack: Stack) -> tuple[None, datetime, str]:
        way = "ahead" if offset_s > 0 else "behind"
        for lane in LANES:
            stack.start_worker(f"w-{way}-{lane}", lane,
                               ["sh", "-c", f'cat >/dev/null; echo "$AUTONOMY_TASK_ID '
                                            f'$AUTONOMY_WORKER" >> {stack.cmd_log}; '
                                            f"sleep {SKEW_WORK_S:g}"],
                               clock_offset_s=offset_s)
        return None, _now(), (f"one worker per lane with its clock {abs(offset_s):g} s "
                              f"{way} (leases {LEASE_S:g} s)")
    return inject


def pg_stop(stack: Stack) -> tuple[str, datetime, str]:
    """The database stopped 40 s (leases of 50 s, longer than the outage)."""
    assert stack.pg is not None
    stack.pg.stop()
    try:
        time.sleep(PG_OUTAGE_S)  # the outage itself
    finally:
        stack.pg.start()
    return "n/a (database down)", _now(), (
        f"database stopped {PG_OUTAGE_S:g} s, leases {PG_LEASE_S:g} s (longer than the "
        "workers' old 30 s retry window)")


# --- the runs --------------------------------------------------------------------------------


def _check(rows: list[Row]) -> list[str]:
    bad = []
    for r in rows:
        if r.lost:
            bad.append(f"{r.fault}/{r.backend}: {r.lost} lost")
        if r.double_grants:
            bad.append(f"{r.fault}/{r.backend}: {r.double_grants} double grants")
        if r.max_in_flight > MAX_IN_FLIGHT:
            bad.append(f"{r.fault}/{r.backend}: a lane over max_in_flight ({r.max_in_flight})")
        if "UNEXPLAINED" in r.duplicates_why:
            bad.append(f"{r.fault}/{r.backend}: duplicate runs {r.duplicates_why}")
        if r.fault.startswith("redis") and not (r.done_during_outage.isdigit()
                                                and int(r.done_during_outage) > 0):
            bad.append(f"{r.fault}/{r.backend}: nothing done during the Redis outage")
        if r.beat_jobs_after <= 0:
            bad.append(f"{r.fault}/{r.backend}: beat sent nothing after the fault")
        if r.job_runs_at_once:
            bad.append(f"{r.fault}/{r.backend}: {r.job_runs_at_once} job runs recorded while "
                       "another run of the job was going (a run-lock did not fence)")
        if "beats alive: 2/2" not in r.notes:
            bad.append(f"{r.fault}/{r.backend}: a beat stopped ({r.notes})")
        if r.left_behind:
            bad.append(f"{r.fault}/{r.backend}: {r.left_behind} process(es) left behind")
    return bad


def _write_table() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("# Fault suite (tests/faults)\n\n"
                   f"{TASKS} tasks per fault run, 4 lanes (maxInFlight {MAX_IN_FLIGHT}), "
                   "8 `autonomy worker` processes, a Celery worker and two beats.\n\n"
                   + table(ROWS) + "\n")


def _survive(backend: str, faults: list[tuple[str, Inject]], *, lease_ttl_s: float = LEASE_S,
             work_s: float = 0.0, fresh_workers: bool = False, each_task_once: bool = False,
             redis_server: Callable[[], ThrowawayRedis] = ThrowawayRedis,
             fleet_host: str = "127.0.0.1") -> None:
    """One stack on ``backend`` (its own Redis, from ``redis_server``, that the fleet
    reaches at ``fleet_host``), and one row per fault, in order, on the lane workers
    started before the first (before each, with ``fresh_workers``: stopped after it).
    Fails on any row that lost a task, granted a lease twice, ran a task twice for no
    reason (for any reason, with ``each_task_once``), recorded two runs of a job at once,
    or left a process behind."""
    # a folder of its own, kept when the run fails (its processes' logs are in it)
    tmp_path = Path(tempfile.mkdtemp(prefix=f"autonomy-faults-{backend}-"))
    pg = Postgres() if backend == "postgres" else None
    url = db.normalise_url(pg.url) if pg else f"sqlite:///{tmp_path / 'faults.db'}"
    db.upgrade(url)
    stack = Stack(backend=backend, tmp=tmp_path, database_url=url, lease_ttl_s=lease_ttl_s,
                  pg=pg, redis=redis_server(), fleet_host=fleet_host)
    rows: list[Row] = []
    try:
        stack.start_celery()
        for fault, inject in faults:
            if fresh_workers or not stack.workers():
                stack.start_workers(work_s=work_s)
            rows.append(_run(stack, fault, inject))
            if fresh_workers:
                stack.stop_workers()
        stack.stop_all()
        left = stack.left_behind()
        assert left == [], f"processes left behind: {left}"
    finally:
        _write_table()
        print("\n" + table(ROWS))
        stack.close()
    bad = _check(rows)
    if each_task_once:
        bad += [f"{r.fault}/{r.backend}: {r.duplicates} duplicate runs ({r.duplicates_why})"
                for r in rows if r.duplicates]
    assert not bad, "\n".join(bad) + f"\n(logs in {tmp_path})"
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_fleet_survives_the_database_stopping() -> None:
    """PostgreSQL stopped 40 s under leases of 50 s: workers keep the outcomes they could
    not report and report them after, nothing runs twice for want of a report."""
    _survive("postgres", [("postgres stop 40 s", pg_stop)], lease_ttl_s=PG_LEASE_S)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_fleet_survives_each_fault(backend: str) -> None:
    _survive(backend, [
        ("redis kill -9 + restart empty", redis_kill_restart),
        ("redis SIGSTOP past lease + reserve", redis_sigstop),
        ("kill -9 of 3 random workers", kill_workers),
        ("kill -9 leading beat + celery child mid-job", kill_beat_and_celery_child),
        ("SIGSTOP run-lock holder past dead-after", sigstop_lock_holder),
    ])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_fleet_survives_redis_answering_with_errors(backend: str) -> None:
    """SPEC 4.7: a full Redis (OOM under noeviction; evicting under volatile-lru and
    allkeys-lru while another app's keys press on it), a read-only replica, a password
    required then fixed: tasks are done while Redis refuses, none lost, no double grant,
    no two runs of a job recorded at once, beat leads again."""
    _survive(backend, [
        ("redis full (OOM, noeviction)", redis_full),
        ("redis full (volatile-lru, another app's volatile keys)", redis_full_volatile),
        ("redis allkeys-lru (another app's keys)", redis_evicting),
        ("redis read-only replica", redis_read_only),
        ("redis password required then fixed", redis_password),
    ])


def _redis7_bound_beyond_loopback() -> ThrowawayRedis:
    """Redis 7 (``DEBUG`` allowed from loopback, ``key-load-delay``) listening on loopback
    and on this machine's own address, where protected mode can refuse the fleet."""
    assert Path(REDIS7).exists(), f"the start-up rows need Redis 7 at {REDIS7}"
    return ThrowawayRedis("--bind", "127.0.0.1", non_loopback_address(), "--protected-mode",
                          "no", "--enable-debug-command", "local", bind=None, binary=REDIS7)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_fleet_starts_while_redis_refuses(backend: str) -> None:
    """SPEC 4.7, "no process alive but silent": the API, a Celery worker, two beats and
    the lane workers start while Redis answers ``DENIED`` (protected mode, the fleet
    reaching it by this machine's address), then ``LOADING`` (restarted on a big dump):
    no action answers 5xx, ``/readyz`` answers 503 naming Redis, tasks are done from the
    database; once Redis serves, a beat leads, the Celery worker runs the checks, nothing
    is lost."""
    _survive(backend, [
        ("redis DENIED (protected mode) while the fleet starts", redis_refusing_at_start(
            "DENIED")),
        ("redis LOADING (a big dump) while the fleet starts", redis_refusing_at_start(
            "LOADING")),
    ], redis_server=_redis7_bound_beyond_loopback, fleet_host=non_loopback_address())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_fleet_survives_workers_with_clocks_ten_minutes_off(backend: str) -> None:
    """SPEC 4.9: workers 10 minutes ahead, then 10 minutes behind, join the honest fleet
    (leases of 6 s, tasks of 0.2 s): no task lost or run twice, no double grant, no lane
    over its limit."""
    _survive(backend, [
        ("workers' clocks 10 min ahead", skewed_workers(SKEW_S)),
        ("workers' clocks 10 min behind", skewed_workers(-SKEW_S)),
    ], work_s=SKEW_WORK_S, fresh_workers=True, each_task_once=True)
