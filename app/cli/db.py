"""``autonomy db``: the schema (``upgrade``, ``downgrade``) and which deployment the
database belongs to (``deployment``, ``bind-deployment``).

``downgrade`` destroys data, so it takes an explicit revision and refuses -- naming what
would be lost -- to go to ``base`` or to run while leases are live, unless ``--force``
(SPEC 4.12)."""

from __future__ import annotations

from collections.abc import Callable

import typer

from app.cli.output import fail, want_json
from app.errors import AutonomyError, InvalidInput


def register(app: typer.Typer) -> None:
    """Add the ``db`` command group."""
    db_app = typer.Typer(no_args_is_help=True,
                         help="Database migrations and the deployment it belongs to.")
    db_app.command("upgrade")(upgrade)
    db_app.command("downgrade")(downgrade)
    app.add_typer(db_app, name="db")


def _guarded(fn: Callable[[], str]) -> None:
    try:
        said = fn()
    except AutonomyError as e:
        fail(e, want_json(None))
        return
    typer.echo(said, err=True)


def upgrade(revision: str = typer.Argument("head", help="Target (default: the newest).")
            ) -> None:
    """Apply migrations (default: to the newest)."""
    from app.ops import schema
    from app.settings import get_settings

    def go() -> str:
        schema.upgrade(get_settings().database_url, revision)
        return "database upgraded"

    _guarded(go)


def downgrade(
    revision: str | None = typer.Argument(None, help="Target revision (no default): an id "
                                          "(e.g. 0004), -N for N steps down (after --), or base "
                                          "(drops every table)."),
    force: bool = typer.Option(False, "--force", help="Downgrade even to base or while "
                               "leases are live (what would be lost is named first)."),
) -> None:
    """Revert migrations to REVISION. Refuses to go to base, or while leases are live,
    without --force."""
    from app.ops import schema
    from app.settings import get_settings

    def go() -> str:
        if not revision:
            raise InvalidInput("db downgrade needs an explicit revision (there is no "
                               "default): an id such as 0004, -1 for one step down, or base "
                               "to drop every table", field="revision")
        done = schema.downgrade(get_settings().database_url, revision, force=force)
        if not done.reverted:
            return f"database already at or below {revision}: nothing reverted"
        lost = f"; dropped what it held: {done.held.describe()}" if done.to_base else ""
        return f"database downgraded to {revision} (reverted {', '.join(done.reverted)}){lost}"

    _guarded(go)
