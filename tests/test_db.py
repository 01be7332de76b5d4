"""The store's schema comes from migrations that go both ways on both databases."""

from __future__ import annotations

import sqlalchemy as sa

from app import db

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
        assert db.current_revision(engine) == "0002"
        indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("task")}
        assert {"ix_task_lane_queue", "ix_task_failure_fingerprint",
                "ix_task_completed_at"} <= indexes
        ffl = {ix["name"] for ix in sa.inspect(engine).get_indexes("failure_fingerprint_log")}
        assert "ix_ffl_fingerprint_created" in ffl
    finally:
        engine.dispose()
