"""Redis fails over under a running fleet (issue 22): the primary's host is cut off and
Sentinel promotes the replica, which never received the primary's last writes.

| host | runs |
|---|---|
| server | PostgreSQL, three sentinels, the API, a Celery worker |
| r1 | the Redis primary (cut) |
| r2 | its replica (promoted) |
| wd, wh | ``autonomy worker`` direct and over HTTP |
| b1, b2 | ``celery -A app.celery_app beat`` each |

Every process is given ``REDIS_URL=redis+sentinel://...``. Before the cut, the replica
stops hearing the primary (the primary's packets to it are dropped): what is written from
then on -- a run's run-lock, beat's leader lease renewals, wakes -- is on the primary only,
as with asynchronous replication falling behind. Then the primary's cable is pulled.

What must hold: no task lost or granted twice; the workers and the Celery worker go on
against the promoted replica; a beat leads again; the run whose lock vanished with the
primary is refused at its fenced write (``run_lock_fenced``). The row is added to the
partition table (``conftest.add_row``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.ops.checks import jobs
from app.settings import Settings
from app.storage import leader as beat_leader
from app.storage import locks
from app.storage.context import Context
from tests.multihost import fleet as fl
from tests.multihost import netns
from tests.multihost.conftest import add_row
from tests.multihost.fleet import LANE, Fleet, make_tmp
from tests.multihost.test_partitions import double_grants
from tests.sentinels import RedisGroup

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

TASKS_BEFORE, TASKS_DURING, TASKS_AFTER = 6, 6, 6
SENTINEL_PORTS = (26379, 26380, 26381)


class SentinelFleet(Fleet):
    """The fleet with its Redis replaced by a primary, a replica and three sentinels."""

    group: RedisGroup

    def start_redis(self) -> None:
        net = self.net
        self.group = RedisGroup(
            self.tmp, password=self.password,
            primary=(net.hosts["r1"].addr, fl.REDIS_PORT),
            replica=(net.hosts["r2"].addr, fl.REDIS_PORT),
            sentinels=[(netns.SERVER_ADDR, p) for p in SENTINEL_PORTS])
        self.redis_url = self.group.url
        hosts = {"primary": net.hosts["r1"], "replica": net.hosts["r2"]}
        for node in self.group.nodes():
            self.start(f"redis-{node.role}", hosts.get(node.role, net.server), node.argv)
        self.redis_procs = tuple(f"redis-{n.role}" for n in self.group.nodes())
        self.wait_for("the primary, its replica and three sentinels to see each other",
                      self.group.ready, 60, list(self.redis_procs))


@pytest.fixture(scope="module")
def sfleet() -> Iterator[SentinelFleet]:
    why = netns.available()
    if why is not None or shutil.which("setpriv") is None:
        why = why or "needs setpriv (util-linux) to run PostgreSQL as non-root"
        if os.environ.get("CI"):
            pytest.fail(f"multihost tests cannot run: {why}")
        pytest.skip(why)
    netns.sweep_orphans()
    tmp = make_tmp()
    net = netns.Network()
    f = SentinelFleet(net, tmp)
    try:
        with netns.entered(net.server.ns):
            for role in ("r1", "r2", "wd", "wh", "b1", "b2"):
                net.add_host(role)
            f.start_servers()
            f.start_api()
            f.api("configure_lane", assignee="mh", maxInFlight=2, actor="multihost")
            f.start_celery_worker()
            f.start_lane_worker(net.hosts["wd"], over_http=False)
            f.start_lane_worker(net.hosts["wh"], over_http=True)
            f.start_beat(net.hosts["b1"])
            f.start_beat(net.hosts["b2"])
            yield f
    finally:
        with contextlib.suppress(Exception):
            f.stop()
        net.destroy()
        keep = os.environ.get("MULTIHOST_KEEP_LOGS")
        if keep:
            shutil.copytree(tmp, Path(keep), dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _create(fleet: Fleet, title: str) -> int:
    answer = fleet.api("create", assignee=LANE, title=title, payload={})
    assert answer["ok"], answer
    return int(answer["task"]["id"])


def _job_runs_since(fleet: Fleet, job: str, since: float) -> bool:
    """Has a run of ``job`` recorded itself (in the database) after ``since``?"""
    rows = fleet.rows("SELECT data FROM check_state WHERE name = :n", n=f"job:{job}")
    return bool(rows) and json.loads(rows[0]["data"])["lastRunAt"] / 1000 > since


def test_the_fleet_goes_on_when_sentinel_promotes_a_replica_that_missed_the_last_writes(
        sfleet: SentinelFleet, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet, net, g = sfleet, sfleet.net, sfleet.group
    beats = {fleet.procs[f"beat-{r}"].pid: r for r in ("b1", "b2")}
    ctx = Context.from_settings(Settings(
        database_url=fleet.database_url, redis_url=g.url, redis_prefix="mh:",
        redis_socket_timeout_s=1.0, lock_heartbeat_interval_ms=fl.LOCK_HEARTBEAT_INTERVAL_MS,
        lock_holder_dead_after_ms=fl.LOCK_HOLDER_DEAD_AFTER_MS,
        beat_lease_ttl_ms=fl.BEAT_LEASE_TTL_MS, beat_lease_renew_ms=fl.BEAT_LEASE_RENEW_MS))
    primary = g.client(g.primary, decode_responses=True)
    lock_key = ctx.keys.lock("readiness")

    def leader() -> str | None:
        holder = beat_leader.view(ctx)["leader"]  # host:pid:beat, while its lease lives
        return beats.get(int(holder.split(":")[1])) if holder else None

    # a run of ours that blocks until told, so that its lock is taken inside the window
    started, go_on = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def held_check(_ctx: Context, _fence: Any) -> dict[str, Any]:
        started.set()
        go_on.wait(120)
        return {"ok": True}

    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the Celery worker's own runs take it too
            try:
                answer = jobs.run_job(ctx, "readiness", holder="doomed-run")
            except Exception as e:
                outcome["error"] = e
                return
            if answer.get("skipped") != "already_running":
                outcome["answer"] = answer
                return
            time.sleep(0.05)

    ids: list[int] = []
    runner = threading.Thread(target=run, name="doomed-run", daemon=True)
    try:
        old_leader = fleet.wait_for("a beat to lead", leader, 60)
        ids += [_create(fleet, f"before {i}") for i in range(TASKS_BEFORE)]
        fleet.wait_for("the tasks before the failover done",
                       lambda: all(fleet.task(i)["status"] == "done" for i in ids), 90)

        # the replica stops hearing the primary: from now on its writes are the primary's
        # alone (each host drops the other's packets)
        r1, r2 = net.hosts["r1"], net.hosts["r2"]
        netns.ip("-n", r1.ns, "route", "add", "blackhole", f"{r2.addr}/32")
        netns.ip("-n", r2.ns, "route", "add", "blackhole", f"{r1.addr}/32")
        monkeypatch.setitem(jobs.CHECKS, "readiness", held_check)
        runner.start()
        assert started.wait(60), outcome
        assert primary.hget(lock_key, "token"), "the run's lock is not on the primary"
        ids += [_create(fleet, f"during {i}") for i in range(TASKS_DURING)]

        net.cut(r1)  # the primary's host: its cable pulled
        t_cut = time.monotonic()
        fleet.wait_for("Sentinel to promote the replica", g.promoted, 60,
                       ["redis-sentinel1", "redis-sentinel2", "redis-sentinel3",
                        "redis-replica"])
        promoted_s = time.monotonic() - t_cut
        t_promoted = time.time()
        promoted = g.client(g.replica, decode_responses=True)
        lock_lost = promoted.hget(lock_key, "token") is None

        go_on.set()
        runner.join(60)
        new_leader = fleet.wait_for("a beat to lead again", leader, 60)
        releads_s = time.monotonic() - t_cut
        ids += [_create(fleet, f"after {i}") for i in range(TASKS_AFTER)]
        fleet.wait_for("every task done", lambda: all(
            fleet.task(i)["status"] == "done" for i in ids), 120)
        fleet.wait_for("the Celery worker to run a check against the new primary",
                       lambda: _job_runs_since(fleet, "status", t_promoted), 60)
    finally:
        go_on.set()
        with contextlib.suppress(RuntimeError):
            net.heal(net.hosts["r1"])
        primary.close()
        if runner.is_alive():
            runner.join(60)
        ctx.close()  # the doomed run has answered (or the test failed before it ran)
    tasks = [fleet.task(i) for i in ids]
    events = fleet.events(ids)
    fenced = fleet.rows("SELECT data FROM event WHERE kind = 'run_lock_fenced'")
    ours = [e for e in fenced if e["data"].get("holder") == "doomed-run"]
    by = {h: sum(t["claimed_by"] == h for t in tasks) for h in ("wd", "wh")}
    add_row({
        "fault": "Redis primary host cut, Sentinel promotes the replica",
        "done": sum(t["status"] == "done" for t in tasks),
        "lost": sum(t["status"] != "done" for t in tasks),
        "double grants": double_grants(events),
        "late completes refused": f"{len(ours)}/1 fenced run write(s)",
        "beat handover s": f"{releads_s:.2f}",
        "notes": (f"replica cut off from the primary, then the primary's link down; "
                  f"promoted after {promoted_s:.1f} s (down-after 1 s); the run's lock "
                  f"{'vanished' if lock_lost else 'survived'} with the primary; "
                  f"{old_leader} led before, {new_leader} after; tasks done by wd {by['wd']}, "
                  f"wh {by['wh']}; run writes fenced in all: {len(fenced)} "
                  f"({', '.join(sorted({str(e['data'].get('refused')) for e in fenced}))}); "
                  f"the Celery worker ran checks after the failover"),
    })
    promoted.close()

    assert lock_lost, "the run's lock reached the replica: the window was not a lost write"
    assert isinstance(outcome.get("error"), locks.RunLockLost), outcome
    assert [e["data"]["refused"] for e in ours] == ["the run's record"], ours
    assert all(t["status"] == "done" for t in tasks), tasks
    assert double_grants(events) == 0, events
    assert sum(e["kind"] == "task_completed" for e in events) == len(ids), events
    for name in ("worker-wd", "worker-wh", "celery-worker", "api"):
        assert fleet.procs[name].alive(), fleet.logs([name])
