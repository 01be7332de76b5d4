"""``autonomy db``: the schema (``upgrade``, ``downgrade``) and which deployment the
database belongs to (``deployment``, ``bind-deployment``).

``downgrade`` destroys data, so it takes an explicit revision and refuses -- naming what
would be lost -- to go to ``base`` or to run while leases are live, unless ``--force``
(SPEC 4.12)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from app.cli.output import fail, run, want_json
from app.errors import AutonomyError, InvalidInput
from app.settings import Settings, get_settings


def register(app: typer.Typer) -> None:
    """Add the ``db`` command group."""
    db_app = typer.Typer(no_args_is_help=True,
                         help="Database migrations and the deployment it belongs to.")
    db_app.command("upgrade")(upgrade)
    db_app.command("downgrade")(downgrade)
    db_app.command("deployment")(show_deployment)
    db_app.command("bind-deployment")(bind_deployment)
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


def _binding_lines(a: dict[str, Any]) -> str:
    bound = a.get("boundTo")
    lines = ["bound to: " + (f"Redis {bound['redis']}, prefix {bound['prefix']!r} (since "
                             f"{bound['boundAt']}, by {bound['boundBy']})" if bound
                             else "nothing yet (the first process to start binds it)")]
    if "this" in a:
        lines.append(f"this environment: Redis {a['this']['redis']}, prefix "
                     f"{a['this']['prefix']!r} ({'matches' if a['matches'] else 'DIFFERS'})")
    if a.get("changed") and a.get("previous"):
        prev = a["previous"]
        lines.append(f"was bound to: Redis {prev['redis']}, prefix {prev['prefix']!r}")
    return "\n".join(lines)


def show_deployment(as_json: bool | None = typer.Option(None, "--json", help="Print JSON.")
                    ) -> None:
    """Which deployment (Redis and key prefix) the database belongs to, and whether this
    environment's REDIS_URL and AUTONOMY_REDIS_PREFIX are it."""
    from app.ops import deployment

    run(lambda: deployment.show(get_settings()), want_json(as_json), _binding_lines)


def bind_deployment(
    force: bool = typer.Option(False, "--force", help="Re-bind a database that belongs to "
                               "another deployment (stop that deployment's processes first)."),
    as_json: bool | None = typer.Option(None, "--json", help="Print JSON."),
) -> None:
    """Bind the database to this environment's Redis (REDIS_URL) and key prefix
    (AUTONOMY_REDIS_PREFIX). Processes of any other deployment are then refused at start."""
    from app.ops import deployment

    run(lambda: deployment.bind(get_settings(), force=force), want_json(as_json),
        _binding_lines)


def belongs_here(settings: Settings, role: str) -> None:
    """Start only on a database of this deployment (SPEC 4.12): exit 1 with
    ``deployment_mismatch`` naming both deployments otherwise (``autonomy worker``)."""
    from app.errors import DeploymentMismatch
    from app.ops import deployment

    try:
        deployment.check_at_start(settings, role)
    except DeploymentMismatch as e:
        fail(e, False)
