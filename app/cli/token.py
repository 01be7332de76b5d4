"""``autonomy token create|list|revoke|rotate``: credentials (SPEC 4.10), on the database
directly -- as operator, recorded as the OS user. A secret is printed once, when it is
minted (or rotated), and never again: only its hash is stored."""

from __future__ import annotations

from typing import Any

import typer

from app.cli.complete import one_of
from app.cli.output import run, table, want_json
from app.ops import credentials
from app.principal import SCOPES, local_operator
from app.storage.context import Context

token_app = typer.Typer(no_args_is_help=True, help="Credentials: create, list, revoke, "
                        "rotate (see docs/security.md).")
JsonOpt = typer.Option(None, "--json", help="Print JSON (the default when piped).")


def register(app: typer.Typer) -> None:
    """Add the ``token`` command group."""
    app.add_typer(token_app, name="token")


def _call(fn: Any, as_json: bool | None, human: Any) -> None:
    def go() -> dict[str, Any]:
        ctx = Context.from_settings()
        try:
            return fn(ctx, local_operator().name)
        finally:
            ctx.close()

    run(go, want_json(as_json), human)


def _minted(a: dict[str, Any]) -> str:
    c = a["credential"]
    bound = ""
    if c["scope"] == "worker":
        who = c["worker"] if c["worker"] else f"{c['workerPrefix']}*"
        bound = f" lanes={','.join(c['lanes'])} worker={who}"
    return (f"credential {c['name']!r} ({c['scope']}){bound}\n"
            f"secret (shown once; store it now): {a['secret']}")


@token_app.command("create")
def create(
    name: str = typer.Option(..., "--name", help="The credential's name (the actor the "
                             "audit trail records)."),
    scope: str = typer.Option(..., "--scope", help=", ".join(SCOPES),
                              autocompletion=one_of(SCOPES)),
    lane: list[str] = typer.Option([], "--lane", help="A worker credential's lane "
                                   "(repeat for more)."),
    worker: str | None = typer.Option(None, "--worker", help="The worker name it may "
                                      "claim as (default: --name)."),
    worker_prefix: str | None = typer.Option(None, "--worker-prefix", help="Or: any "
                                             "worker name starting with this."),
    as_json: bool | None = JsonOpt,
) -> None:
    """Mint a credential and print its secret, once."""
    _call(lambda ctx, by: credentials.create(
        ctx, name=name, scope=scope, lanes=lane, worker=worker, worker_prefix=worker_prefix,
        created_by=by), as_json, _minted)


@token_app.command("list")
def list_(all_: bool = typer.Option(False, "--all", help="Include revoked ones."),
          as_json: bool | None = JsonOpt) -> None:
    """The credentials (names, scopes, bindings; never a secret)."""
    _call(lambda ctx, by: credentials.list_credentials(ctx, include_revoked=all_), as_json,
          lambda a: table(a["credentials"], ["name", "scope", "lanes", "worker",
                                             "workerPrefix", "createdAt", "createdBy",
                                             "revokedAt"]))


@token_app.command("revoke")
def revoke(name: str, as_json: bool | None = JsonOpt) -> None:
    """Revoke a credential: refused by every API process within a second."""
    _call(lambda ctx, by: credentials.revoke(ctx, name=name, by=by), as_json,
          lambda a: f"credential {a['revoked']!r} revoked")


@token_app.command("rotate")
def rotate(name: str, as_json: bool | None = JsonOpt) -> None:
    """Revoke a credential and mint it again (same scope and bindings, a new secret)."""
    _call(lambda ctx, by: credentials.rotate(ctx, name=name, by=by), as_json, _minted)
