"""Many hosts and partitions: a worker host cut off mid-lease for longer than its lease
(the direct worker, then the HTTP worker), and the leading beat's host cut off.

What must hold (issue 13, SPEC 1 and 4.7): the cut-off host's task is requeued and done
once elsewhere; its late complete after healing is refused ``stale_lease`` and its result
is not recorded; its worker goes on working after healing without a restart; a standby
beat leads within the leader lease TTL and no job is sent twice in one period; no task is
lost. Each fault adds a row to the partition table (``conftest.add_row``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.settings import Settings
from app.storage import leader as beat_leader
from app.storage.context import Context
from tests.multihost import fleet as fl
from tests.multihost.conftest import add_row
from tests.multihost.fleet import LANE, Fleet

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

BACKGROUND_TASKS = 8
GRANT_ENDS = ("lease_requeued", "lease_released", "fingerprint_recorded")


def double_grants(events: list[dict[str, Any]]) -> int:
    """Leases granted on a task while an earlier lease on it had not ended (requeued,
    released or returned by a failure): each such grant counts once."""
    open_leases: dict[int, int] = defaultdict(int)
    doubles = 0
    for e in events:
        tid = e["task_id"]
        if e["kind"] == "lease_granted":
            if open_leases[tid] > 0:
                doubles += 1
            open_leases[tid] += 1
        elif e["kind"] in GRANT_ENDS or e["kind"] == "task_completed":
            open_leases[tid] = max(0, open_leases[tid] - 1)
    return doubles


def _worker_word(log: str, task_id: int, *, own: bool = False) -> str | None:
    """The cut-off worker's last word on ``task_id``: ``done`` (its complete was taken),
    ``complete/outcome refused (code)`` (sent and refused), or why it sent nothing
    (``outcome kept ...``, ``lease lost ...``, ``gave up``; with ``own``, only the words
    that name the task)."""
    pat = re.compile(rf"task {task_id}: (done|(?:complete|outcome) refused \(\w+\)|"
                     rf"outcome kept.*|lease lost.*|failed.*)")
    found = [m.group(1) for m in pat.finditer(log)]
    if found or own:
        return found[-1] if found else None
    return "gave up" if "giving up after" in log else None


def _sent(word: str) -> bool:
    """Did the worker send its complete (taken or refused)?"""
    return word == "done" or " refused (" in word


def _late_complete(fleet: Fleet, host: str, task_id: int, token: str) -> dict[str, Any]:
    """A complete with the cut-off worker's token, sent from its host by the client it uses."""
    argv = [sys.executable, str(fl.REPO / "tests" / "multihost" / "late.py"), str(task_id),
            token]
    env = fleet.env(host)
    if host == "wh":
        argv += ["--url", fleet.api_url, "--token", fleet.token]
    else:
        env["DATABASE_URL"] = fleet.database_url + fl.DIRECT_DB_PARAMS
    out = subprocess.run(fleet.net.hosts[host].argv(*argv), cwd=fl.REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return answer


def _create(fleet: Fleet, title: str, **payload: Any) -> int:
    answer = fleet.api("create", assignee=LANE, title=title, payload=payload)
    assert answer["ok"], answer
    return int(answer["task"]["id"])


@contextlib.contextmanager
def _parked(fleet: Fleet, worker: str) -> Iterator[None]:
    """SIGSTOP a worker process (not its command) while the block runs."""
    fleet.procs[worker].signal(signal.SIGSTOP)
    try:
        yield
    finally:
        fleet.procs[worker].signal(signal.SIGCONT)


def _cut_worker_mid_lease(fleet: Fleet, *, cut: str, other: str, how: str,
                          fault: str) -> None:
    net = fleet.net
    wcut, wother = f"worker-{cut}", f"worker-{other}"
    pid_before = fleet.procs[wcut].pid
    gate = fleet.tmp / f"gate-{cut}"
    # the held task goes to the host we will cut: park the other worker until it has it
    with _parked(fleet, wother):
        held = _create(fleet, f"held on {cut}", holdOn=cut, gate=str(gate))
        fleet.wait_for(f"{cut} to start the held task",
                       lambda: Path(f"{gate}.started").exists(), 60, [wcut])
    first = fleet.task(held)
    assert first["status"] == "in_progress" and first["claimed_by"] == cut
    background = [_create(fleet, f"background {i}") for i in range(BACKGROUND_TASKS)]

    net.cut(net.hosts[cut], how)
    t_cut = time.time()
    try:
        redone = fleet.wait_for(f"the held task done on {other}",
                                lambda: (r := fleet.task(held))["status"] == "done" and r,
                                60, [wother, "api", "postgres", "redis"])
        gate.touch()  # the cut-off command finishes now; its answer cannot get through
        fleet.wait_for(f"the command on {cut} to finish",
                       lambda: Path(f"{gate}.finished").exists(), 60, [wcut])
        # the worker has tried to complete (and failed: it is cut off) and said what it
        # did about it -- heal only then, so any complete it still sends is late
        fleet.wait_for(f"{cut} to try to complete task {held}",
                       lambda: _worker_word(fleet.procs[wcut].output(), held, own=True),
                       60, [wcut])
    finally:
        net.heal(net.hosts[cut])
    t_heal = time.time()
    word = fleet.wait_for(f"{cut}'s last word on task {held} after healing",
                          lambda: _worker_word(fleet.procs[wcut].output(), held), 120, [wcut])
    t_answer = time.time()
    # whether or not the worker still sends it (SPEC 4.7: it may keep an outcome it could not
    # report once its lease ran out), the late complete it would send, from its host
    explicit = _late_complete(fleet, cut, held, first["lease_token"])

    # the healed worker goes on: park the other one so the next task must be its
    with _parked(fleet, wother):
        after = _create(fleet, f"after healing {cut}")
        again = fleet.wait_for(f"{cut} to finish a task after healing",
                               lambda: (r := fleet.task(after))["status"] == "done" and r,
                               90, [wcut])
    ids = [held, *background, after]
    fleet.wait_for("every task of the phase done",
                   lambda: all(fleet.task(i)["status"] == "done" for i in ids), 90)
    tasks = {i: fleet.task(i) for i in ids}
    events = fleet.events(ids)
    held_events = [e for e in events if e["task_id"] == held]
    refused = [e for e in held_events
               if e["kind"] == "complete_refused" and e["reason"] == "stale_lease"]
    late_sent = int(_sent(word)) + 1
    requeued_at = min(e["at"].timestamp() for e in held_events if e["kind"] == "lease_requeued")
    first_after = min(t["completed_at"].timestamp() for t in tasks.values()
                      if t["claimed_by"] == cut and t["completed_at"].timestamp() > t_heal)
    add_row({
        "fault": fault,
        "done": sum(t["status"] == "done" for t in tasks.values()),
        "lost": sum(t["status"] != "done" for t in tasks.values()),
        "double grants": double_grants(events),
        "late completes refused": f"{len(refused)}/{late_sent}",
        "notes": (f"held task {held}: cut -> requeued {requeued_at - t_cut:.1f} s, -> done on "
                  f"{other} {tasks[held]['completed_at'].timestamp() - t_cut:.1f} s; cut "
                  f"lasted {t_heal - t_cut:.1f} s (lease {fl.LEASE_TTL_S:g} s); heal -> "
                  f"worker's last word {t_answer - t_heal:.1f} s ({word!r}); the same "
                  f"complete sent again from {cut}: {explicit.get('error', 'ok')}; heal -> "
                  f"{cut} finished a task {first_after - t_heal:.1f} s"),
    })

    # requeued after its lease expired, and done once, elsewhere, with that host's result
    assert any(e["kind"] == "lease_requeued" for e in held_events), held_events
    assert sum(e["kind"] == "task_completed" for e in held_events) == 1, held_events
    assert redone["claimed_by"] == other
    assert tasks[held]["result"] == {"host": other, "taskId": held}, tasks[held]
    assert double_grants(events) == 0, events
    # the healed worker kept running (same process) and did new work
    assert fleet.procs[wcut].alive() and fleet.procs[wcut].pid == pid_before
    assert again["claimed_by"] == cut and again["result"] == {"host": cut, "taskId": after}
    # its late complete was refused as stale -- the worker's own, when it sent one, and the
    # same request sent from its host -- and each refusal is on the task's record
    if _sent(word):
        assert re.fullmatch(r"(complete|outcome) refused \(stale_lease\)", word), (
            f"{cut}'s late complete on task {held} was answered {word!r}")
    assert explicit == {"ok": False, "error": "stale_lease"}, explicit
    assert len(refused) == late_sent, held_events


def test_a_direct_worker_cut_off_mid_lease_is_requeued_elsewhere_and_refused_after_healing(
        fleet: Fleet) -> None:
    _cut_worker_mid_lease(fleet, cut="wd", other="wh",
                          how="blackhole", fault="direct worker host cut mid-lease (blackhole)")


def test_an_http_worker_cut_off_mid_lease_is_requeued_elsewhere_and_refused_after_healing(
        fleet: Fleet) -> None:
    _cut_worker_mid_lease(fleet, cut="wh", other="wd", how="link",
                          fault="HTTP worker host cut mid-lease (link down)")


# --- the beat ---------------------------------------------------------------------------

_TASK_NAME = re.compile(r'task\\?"\s*:\s*\\?"tasks\.checks\.(\w+)')
_TASK_ID = re.compile(r'[{ ]\\?"id\\?"\s*:\s*\\?"([0-9a-f-]{36})')
Send = tuple[float, str, str, str]  # (Redis time, job, sender address, task id)


class BrokerTap:
    """Every message a beat host pushed to the broker, as Redis saw it (``Send``), from
    ``MONITOR`` on a connection of its own."""

    def __init__(self, fleet: Fleet, senders: set[str]) -> None:
        self.senders = senders
        self.sends: list[Send] = []
        self._stop = threading.Event()
        self._client = redis.Redis.from_url(fleet.redis_url)
        self._thread = threading.Thread(target=self._run, name="broker-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._client.monitor() as m:
            for cmd in m.listen():
                if self._stop.is_set():
                    return
                text = str(cmd.get("command", ""))
                if not text.upper().startswith("LPUSH"):
                    continue
                job, tid = _TASK_NAME.search(text), _TASK_ID.search(text)
                if job and cmd.get("client_address") in self.senders:
                    self.sends.append((float(cmd["time"]), job.group(1),
                                       str(cmd["client_address"]), tid.group(1) if tid else ""))

    def from_(self, addr: str, since: float = 0.0) -> list[Send]:
        return [s for s in list(self.sends) if s[2] == addr and s[0] >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()


def sent_twice_in_a_period(sends: list[Send], period_s: float) -> list[Any]:
    """Pairs of sends of one job closer than half a period: one leader never sends a job
    faster than its period, two leaders sending at once always do at least once a period."""
    by_job: dict[str, list[float]] = defaultdict(list)
    for at, job, _, _ in sends:
        by_job[job].append(at)
    pairs = []
    for job, times in by_job.items():
        times.sort()
        pairs += [(job, a, b) for a, b in itertools.pairwise(times)
                  if b - a < period_s / 2]
    return pairs


EXPIRED_UNRUN = "expired, not run"


def _fates(fleet: Fleet, sends: list[Send]) -> list[str] | None:
    """Each send's stored outcome, in order (``job: SUCCESS``; ``job: expired, not run``
    when the worker refused it as older than its period, ``tasks.checks``; ``job: REVOKED``
    when Celery expired it unrun); None while one has no stored result yet."""
    r = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    try:
        out = []
        for _, job, _, tid in sends:
            meta = r.get(f"mh:celery:celery-task-meta-{tid}")
            if meta is None:
                return None
            stored = json.loads(meta)
            result = stored.get("result")
            skipped = isinstance(result, dict) and result.get("skipped") == "expired"
            out.append(f"{job}: {EXPIRED_UNRUN if skipped else stored['status']}")
        return out
    finally:
        r.close()


def test_a_standby_beat_leads_within_the_lease_ttl_when_the_leaders_host_is_cut_off(
        fleet: Fleet) -> None:
    net = fleet.net
    beats = {fleet.procs[f"beat-{r}"].pid: r for r in ("b1", "b2")}
    ctx = Context.from_settings(Settings(
        database_url=fleet.database_url, redis_url=fleet.redis_url, redis_prefix="mh:",
        beat_lease_ttl_ms=fl.BEAT_LEASE_TTL_MS, beat_lease_renew_ms=fl.BEAT_LEASE_RENEW_MS))
    tap = BrokerTap(fleet, {net.hosts["b1"].addr, net.hosts["b2"].addr})
    period, ttl_s = fl.BEAT_EVERY_S, fl.BEAT_LEASE_TTL_MS / 1000

    def leader() -> str | None:
        holder = beat_leader.view(ctx)["leader"]  # host:pid:beat, while its lease lives
        return beats.get(int(holder.split(":")[1])) if holder else None

    try:
        old = fleet.wait_for("a beat to lead", leader, 60)
        new = "b2" if old == "b1" else "b1"
        old_addr, new_addr = net.hosts[old].addr, net.hosts[new].addr
        fleet.wait_for("the leader to send two rounds", lambda: len(tap.from_(old_addr)) >= 8,
                       60)
        standby_before = len(tap.from_(new_addr))
        net.cut(net.hosts[old])
        t_cut = time.monotonic()
        try:
            fleet.wait_for(f"{new} to lead", lambda: leader() == new, 60,
                           [f"beat-{new}", "redis"])
            handover_s = time.monotonic() - t_cut
            led_at = time.time()
            fleet.wait_for(f"{new} to send two rounds",
                           lambda: len(tap.from_(new_addr, led_at)) >= 8, 60,
                           [f"beat-{new}", "redis"])
        finally:
            net.heal(net.hosts[old])
        healed_at = time.time()
        old_beat = fleet.procs[f"beat-{old}"]
        fleet.wait_for(f"{old} to step down after healing",
                       lambda: not old_beat.alive() or "lock lost" in old_beat.output(), 60,
                       [f"beat-{new}"])
        fleet.wait_for(f"{new} to send two more rounds after healing",
                       lambda: len(tap.from_(new_addr, healed_at)) >= 8, 60,
                       [f"beat-{new}", "redis"])
    finally:
        tap.close()
        ctx.close()
    # what became of the deposed leader's sends that reached Redis once the new one led:
    # one pushed just before the cut arrives after the heal (TCP sends it again); it
    # carries its send time on Redis's clock and the worker refuses it as expired. That
    # is a message, not a run: any other late send of the old leader is a double
    late_old = tap.from_(old_addr, led_at)
    def settled() -> tuple[list[str]] | None:  # truthy once settled, even with no send
        got = _fates(fleet, late_old)
        return None if got is None else (got,)

    fates = fleet.wait_for("the old leader's late messages to be settled", settled, 60,
                           ["celery-worker"])[0]
    unrun = {s[3] for s, fate in zip(late_old, fates, strict=True)
             if fate.endswith(EXPIRED_UNRUN)}
    # a second send of a job in one period: one closer than half a period to another, or
    # any send of the deposed leader once the new one leads (the new one sends that period)
    sends = sorted(s for s in tap.sends if s[3] not in unrun)
    doubles = sorted({(job, b) for job, _, b in sent_twice_in_a_period(sends, period)}
                     | {(job, at) for at, job, _, tid in late_old if tid not in unrun})
    add_row({
        "fault": "leading beat host cut",
        "done": len(sends),
        "lost": "-",
        "double grants": f"{len(doubles)} (sends in one period)",
        "late completes refused": "-",
        "beat handover s": f"{handover_s:.2f}",
        "notes": (f"{old} led, {new} took over; "
                  f"period {period:g} s, leader lease TTL {ttl_s:g} s (+ standby poll "
                  f"{fl.BEAT_STANDBY_POLL_S:g} s); {len(late_old)} send(s) from the old "
                  f"leader after the new one led ({', '.join(fates) or 'none'}); old leader "
                  f"{'exited' if not old_beat.alive() else 'still running'}"),
    })
    assert standby_before == 0, "the standby sent while the leader led"
    assert not doubles, (doubles, late_old)
    # a lease that is not renewed lapses within the TTL; a standby looks every poll_s and,
    # having seen a leader, confirms the lease is still free a few renewals later (so that
    # after a Redis restart the leader re-takes it first: app.storage.beat_guard); this test
    # looks every 0.1 s on a loaded machine: half a second of slack for that
    confirm_s = 2.5 * fl.BEAT_LEASE_RENEW_MS / 1000
    bound_s = ttl_s + fl.BEAT_STANDBY_POLL_S + confirm_s + 0.5
    assert handover_s <= bound_s, f"handover took {handover_s:.2f} s; lease TTL {ttl_s:g} s"
