"""``autonomy serve`` (the API and control panel) and ``autonomy up`` (everything, for local
use: API, Celery worker, beat, Flower, and an embedded Redis when none is around)."""

from __future__ import annotations

import logging

import typer

from app import logs
from app.netaddr import is_loopback
from app.settings import Settings, get_settings


def register(app: typer.Typer) -> None:
    """Add the ``serve`` and ``up`` commands."""
    app.command("serve")(serve)
    app.command("up")(up)


def refuse_open_bind(settings: Settings, host: str) -> str | None:
    """Why the server may not bind ``host`` (no API token and not loopback), or None."""
    from app.api.deps import configured_token

    if configured_token(settings) is None and not is_loopback(host):
        return (f"refusing to serve on {host} without an API token: anyone who can reach it "
                "could change the fleet. Set AUTONOMY_API_TOKEN (mutating calls then need "
                "'Authorization: Bearer <token>') or bind a loopback address (127.0.0.1).")
    return None


def serve(
    host: str | None = typer.Option(None, help="Address to bind (default AUTONOMY_API_HOST, "
                                    "127.0.0.1). Non-loopback needs AUTONOMY_API_TOKEN."),
    port: int | None = typer.Option(None, min=0, max=65535,
                                    help="Port (default AUTONOMY_API_PORT, 8000)."),
    access_log: bool = typer.Option(True, help="Log every request (with its request id)."),
) -> None:
    """Serve the HTTP API and the control panel."""
    import uvicorn

    from app.api.app import create_app

    settings = get_settings()
    h = host if host is not None else settings.api_host
    p = port if port is not None else settings.api_port
    why = refuse_open_bind(settings, h)
    if why is not None:
        typer.echo(f"error: {why}", err=True)
        raise typer.Exit(2)
    # the bind address is one of the Host names the server answers to (SPEC 4.8)
    settings = settings.model_copy(update={"api_host": h})
    logs.configure(settings, process="api")
    if not access_log:
        logging.getLogger("app.api.access").setLevel(logging.WARNING)
    # log_config=None: uvicorn keeps its hands off logging (app.logs routes its lines);
    # its access log is off because app.api.request_log writes one with the request id
    uvicorn.run(create_app(settings), host=h, port=p, access_log=False, log_config=None,
                ws="none", lifespan="on")


def up(
    demo: bool = typer.Option(False, "--demo", help="Seed demo lanes and run two demo "
                              "workers (one healthy, one that trips the breaker)."),
    no_flower: bool = typer.Option(False, "--no-flower", help="Do not start Flower."),
    host: str | None = typer.Option(None, help="API address (default AUTONOMY_API_HOST)."),
    port: int | None = typer.Option(None, min=0, max=65535,
                                    help="API port (default AUTONOMY_API_PORT)."),
    flower_port: int | None = typer.Option(None, min=0, max=65535,
                                           help="Flower port (default AUTONOMY_FLOWER_PORT)."),
    raw_logs: bool | None = typer.Option(None, "--raw-logs/--prefixed-logs",
                                         help="Pass the children's lines through untouched "
                                         "(default with AUTONOMY_LOG_FORMAT=json, where "
                                         "up's own lines are JSON too), or prefix each "
                                         "with its child's name (the text default)."),
) -> None:
    """Migrate, then run the API, a Celery worker, beat and Flower until Ctrl-C."""
    from app.local.up import Supervisor

    settings = get_settings()
    logs.configure(settings, process="up", level=logging.WARNING)
    h = host if host is not None else settings.api_host
    why = refuse_open_bind(settings, h)
    if why is not None:
        typer.echo(f"error: {why}", err=True)
        raise typer.Exit(2)
    sup = Supervisor(settings, host=h, port=port if port is not None else settings.api_port,
                     flower_port=flower_port if flower_port is not None
                     else settings.flower_port, flower=not no_flower, demo=demo,
                     raw_logs=raw_logs)
    raise typer.Exit(sup.run())
