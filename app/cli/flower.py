"""``autonomy flower``: Celery's monitoring UI for this app's broker and queue.

Runs ``celery -A app.celery_app flower`` in this process's place (exec). The basic-auth
credentials go to Flower through its ``FLOWER_BASIC_AUTH`` environment variable, not the
command line, so ``ps`` does not show them. Flower without basic auth binds loopback only.
"""

from __future__ import annotations

import os

import typer

from app.local.flower import flower_argv, refuse_open_flower
from app.settings import get_settings


def register(app: typer.Typer) -> None:
    """Add the ``flower`` command."""
    app.command("flower")(flower)


def flower(
    address: str = typer.Option("127.0.0.1", help="Address to bind. Non-loopback needs "
                                "AUTONOMY_FLOWER_BASIC_AUTH."),
    port: int | None = typer.Option(None, min=1, max=65535,
                                    help="Port (default AUTONOMY_FLOWER_PORT, 5555)."),
) -> None:
    """Run Flower (Celery's monitoring UI) for the check jobs' workers."""
    settings = get_settings()
    why = refuse_open_flower(address, settings.flower_basic_auth)
    if why is not None:
        typer.echo(f"error: {why}", err=True)
        raise typer.Exit(2)
    env = dict(os.environ)
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    argv = flower_argv(address=address, port=port or settings.flower_port)
    os.execve(argv[0], argv, env)
