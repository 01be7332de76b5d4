"""PostgreSQL lane slots (migration 0005): a lane's claims run side by side, each granting
into a slot of its own, and the lane still never holds more live leases than its
``max_in_flight`` -- with the claims' transactions held open on real connections, so each
test sees who waits on whom. (Racing processes: tests/test_race.py.)"""

from __future__ import annotations

import secrets
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from app.storage import db

pytestmark = pytest.mark.postgres

LANE = "slots"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
EXPIRES = NOW + timedelta(minutes=5)


@pytest.fixture
def dsn(pg_url: str) -> str:
    return db.normalise_url(pg_url).replace("postgresql+psycopg://", "postgresql://")


def _connect(dsn: str, opened: list[psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
    c = psycopg.connect(dsn)
    opened.append(c)
    return c


def _lane(dsn: str, *, max_in_flight: int, tasks: int) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO lane (assignee, paused, max_in_flight, created_at)"
                  " VALUES (%s, false, %s, %s)", (LANE, max_in_flight, NOW))
        return [c.execute(
            "INSERT INTO task (title, assignee, kind, status, priority, payload, attempts,"
            " lane_paused, created_at, updated_at) VALUES (%s, %s, 'work', 'todo', 0, '{}',"
            " 0, false, %s, %s) RETURNING id", (f"t{i}", LANE, NOW, NOW)).fetchone()[0]
            for i in range(tasks)]


def _claim(conn: psycopg.Connection[Any], worker: str, *, n: int = 1) -> dict[str, Any]:
    """``autonomy_claim`` in the connection's open transaction: ``{outcome: [rows]}``."""
    rows = conn.execute(
        "SELECT outcome, row_json FROM autonomy_claim(%s, %s, %s::text[], %s::float8,"
        " %s::timestamptz)",
        (LANE, worker, [secrets.token_hex(16) for _ in range(n)],
         (EXPIRES - NOW).total_seconds(), NOW)).fetchall()
    out: dict[str, Any] = {}
    for outcome, row in rows:
        out.setdefault(outcome, []).append(row)
    return out


def _live(dsn: str) -> list[tuple[int, str, int | None]]:
    with psycopg.connect(dsn) as c:
        return [tuple(r) for r in c.execute(  # type: ignore[misc]
            "SELECT id, claimed_by, lease_slot FROM task WHERE assignee = %s AND"
            " status = 'in_progress' AND lease_expires_at > %s ORDER BY id", (LANE, NOW))]


def _waits_on_a_lock(dsn: str, pid: int, claiming: threading.Thread) -> None:
    """Block until backend ``pid`` waits on an advisory lock, or its claim has ended."""
    with psycopg.connect(dsn, autocommit=True) as c:
        while claiming.is_alive() and c.execute(
                "SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                (pid,)).fetchone() != ("advisory",):
            c.execute("SELECT pg_sleep(0.01)")


def test_a_lanes_claims_run_side_by_side_in_slots_of_their_own(dsn: str) -> None:
    """A claim whose transaction is still open does not hold up the lane's next claim
    (before 0005 it did: the lane's claim lock was held to the commit); the two leases
    take different slots."""
    _lane(dsn, max_in_flight=4, tasks=4)
    opened: list[psycopg.Connection[Any]] = []
    try:
        a, b = _connect(dsn, opened), _connect(dsn, opened)
        got_a = _claim(a, "wa")  # granted; a's transaction stays open
        b.execute("SET lock_timeout = '2s'")  # a claim that waited on a's locks would fail
        got_b = _claim(b, "wb")
        assert len(got_a["granted"]) == 1 and len(got_b["granted"]) == 1
        slots = {got_a["granted"][0]["lease_slot"], got_b["granted"][0]["lease_slot"]}
        assert len(slots) == 2 and slots <= {0, 1, 2, 3}
        a.commit()
        b.commit()
    finally:
        for c in opened:
            c.close()
    assert sorted(s for _, _, s in _live(dsn)) == sorted(slots)  # type: ignore[type-var]


def test_a_claim_waits_for_a_slot_being_claimed_then_answers_the_full_lane(dsn: str) -> None:
    """Lane of one slot: while one claim holds it (transaction open), a second claim waits
    for that slot instead of granting beside it; once the first commits its lease, the
    second answers the lane as full, with that lease -- one live lease, never two."""
    _lane(dsn, max_in_flight=1, tasks=3)
    opened: list[psycopg.Connection[Any]] = []
    answer: dict[str, Any] = {}
    try:
        a, b = _connect(dsn, opened), _connect(dsn, opened)
        got_a = _claim(a, "wa")
        assert len(got_a["granted"]) == 1
        b_pid = b.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        t = threading.Thread(target=lambda: answer.update(_claim(b, "wb")))
        t.start()
        _waits_on_a_lock(dsn, b_pid, t)
        assert t.is_alive() and answer == {}
        a.commit()
        t.join(60)
        assert not t.is_alive()
        b.commit()
    finally:
        for c in opened:
            c.close()
    assert "granted" not in answer
    assert [r["id"] for r in answer["held"]] == [got_a["granted"][0]["id"]]
    assert [(w, s) for _, w, s in _live(dsn)] == [("wa", 0)]


def test_leases_without_a_slot_are_counted_with_every_slot_claim_held_off(dsn: str) -> None:
    """A lease granted before 0005 has no slot: while one is live, claims count every
    live lease under the lane's exclusive lock (a claim in flight holds the next one off)
    and grant into free slots -- the lane stays within max_in_flight."""
    _lane(dsn, max_in_flight=2, tasks=4)
    with psycopg.connect(dsn) as c:
        old = _claim(c, "w-old")["granted"][0]["id"]
        c.execute("UPDATE task SET lease_slot = NULL WHERE id = %s", (old,))
    opened: list[psycopg.Connection[Any]] = []
    try:
        a, b = _connect(dsn, opened), _connect(dsn, opened)
        got_a = _claim(a, "wa")
        assert len(got_a["granted"]) == 1 and got_a["granted"][0]["lease_slot"] in (0, 1)
        b.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            _claim(b, "wb")  # waits on a's exclusive lock: counted after a, not beside it
        b.rollback()
        a.commit()
        full = _claim(b, "wb")
        b.commit()
    finally:
        for c in opened:
            c.close()
    assert "granted" not in full and len(full["held"]) == 1
    assert sorted(w for _, w, _ in _live(dsn)) == ["w-old", "wa"]


def test_a_lowered_max_in_flight_holds_claims_until_the_lane_is_below_it(dsn: str) -> None:
    """Four leases in slots 0-3, then max_in_flight 4 -> 2: the leases above the new
    limit are outside the slots, so claims are refused until fewer than two leases are
    live, and the next grant takes a slot below the new limit."""
    tasks = _lane(dsn, max_in_flight=4, tasks=8)
    with psycopg.connect(dsn) as c:
        held = {w: _claim(c, w)["granted"][0] for w in ("w0", "w1", "w2", "w3")}
        c.commit()
        assert sorted(r["lease_slot"] for r in held.values()) == [0, 1, 2, 3]
        c.execute("UPDATE lane SET max_in_flight = 2 WHERE assignee = %s", (LANE,))
        c.commit()

        def done(worker: str) -> None:
            c.execute("UPDATE task SET status = 'done' WHERE id = %s", (held[worker]["id"],))
            c.commit()

        by_slot = {r["lease_slot"]: w for w, r in held.items()}
        done(by_slot[0])  # three live: 1, 2, 3
        assert "granted" not in _claim(c, "wx")
        done(by_slot[3])  # two live: 1, 2 -- the lane is at its new limit
        assert "granted" not in _claim(c, "wx")
        done(by_slot[2])  # one live, in slot 1
        got = _claim(c, "wx")
        c.commit()
    assert [r["lease_slot"] for r in got["granted"]] == [0]
    assert sorted(s for _, _, s in _live(dsn)) == [0, 1]  # type: ignore[type-var]
    assert len(tasks) == 8


def test_a_prefetching_claim_takes_one_slot_per_lease(dsn: str) -> None:
    """A claim for three leases on a lane of four takes three distinct slots; the next
    worker gets the fourth, the one after is refused."""
    _lane(dsn, max_in_flight=4, tasks=6)
    with psycopg.connect(dsn) as c:
        three = _claim(c, "wa", n=3)["granted"]
        one = _claim(c, "wb", n=3)["granted"]
        none = _claim(c, "wc")
        c.commit()
    assert sorted(r["lease_slot"] for r in three + one) == [0, 1, 2, 3]
    assert len(three) == 3 and len(one) == 1 and "granted" not in none
