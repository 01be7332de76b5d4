"""The store's schema comes from migrations that go both ways on both databases."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.storage import db

TABLES = {"task", "lane", "failure_fingerprint_log", "event", "check_state"}


def _tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_migrations_upgrade_downgrade_upgrade(database_url: str) -> None:
    assert _tables(database_url) == TABLES
    db.downgrade(database_url, "base")
    assert _tables(database_url) == set()
    db.upgrade(database_url)
    assert _tables(database_url) == TABLES
    engine = db.make_engine(database_url)
    try:
        assert db.current_revision(engine) == "0006"
        if db.is_postgres(engine):  # the claim in one call (0003), complete+claim (0004)
            with engine.connect() as c:
                assert c.exec_driver_sql(
                    "SELECT count(*) FROM pg_proc WHERE proname IN "
                    "('autonomy_claim', 'autonomy_complete')").scalar_one() == 2
        indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("task")}
        assert {"ix_task_lane_queue", "ix_task_failure_fingerprint",
                "ix_task_completed_at"} <= indexes
        ffl = {ix["name"] for ix in sa.inspect(engine).get_indexes("failure_fingerprint_log")}
        assert {"ix_ffl_fingerprint_created", "ix_ffl_created_at"} <= ffl
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_the_next_task_is_read_from_the_lane_index_in_claim_order(pg_url: str) -> None:
    """The claim takes the lane's first index entry: no sort of the backlog under the lane
    lock (the plan PostgreSQL picks once sequential scans are off for this transaction)."""
    from app.storage import store

    engine = db.make_engine(pg_url)
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
            stmt = store.claim_next_pick(assignee="coder", pg=True)
            sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
            plan = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + sql)))
    finally:
        engine.dispose()
    assert "ix_task_lane_queue" in plan and "Sort" not in plan, plan
