"""``autonomy db current|history|stamp``: where the database's schema stands, the
migrations this code ships, and recording a revision without running it (beside
``db upgrade`` / ``db downgrade``, which live with the ``db`` group)."""

from __future__ import annotations

from typing import Any

import typer

from app.cli.output import run, want_json

JsonOpt = typer.Option(None, "--json", help="Print JSON (the default when piped).")


def register(app: typer.Typer) -> None:
    """Add ``current``, ``history`` and ``stamp`` to the ``db`` group."""
    db_app = next(g.typer_instance for g in app.registered_groups if g.name == "db")
    assert db_app is not None
    db_app.command("current")(current)
    db_app.command("history")(history)
    db_app.command("stamp")(stamp)


def _url() -> str:
    from app.settings import get_settings

    return get_settings().database_url


def _current_line(a: dict[str, Any]) -> str:
    if a["current"] is None:
        return f"no migration applied (head: {a['head']}); run `autonomy db upgrade`"
    return f"{a['current']} (head)" if a["atHead"] else \
        f"{a['current']} (head: {a['head']}; run `autonomy db upgrade`)"


def current(as_json: bool | None = JsonOpt) -> None:
    """The database's revision, beside the newest this code ships."""
    from app.ops import schema

    run(lambda: schema.current(_url()), want_json(as_json), _current_line)


def _history_lines(a: dict[str, Any]) -> str:
    return "\n".join(f"{r['downRevision'] or '<base>'} -> {r['revision']}"
                     f"{' (head)' if r['head'] else ''}, {r['doc']}" for r in a["revisions"])


def history(as_json: bool | None = JsonOpt) -> None:
    """The migrations this code ships, newest first."""
    from app.ops import schema

    run(schema.history, want_json(as_json), _history_lines)


def stamp(revision: str = typer.Argument(..., help="A revision id, or head."),
          as_json: bool | None = JsonOpt) -> None:
    """Record REVISION as the database's without running any migration."""
    from app.ops import schema

    run(lambda: schema.stamp(_url(), revision), want_json(as_json),
        lambda a: f"database stamped {a['current']}")
