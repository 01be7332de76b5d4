"""``autonomy serve`` (the API and control panel) and ``autonomy up`` (everything, for local
use: API, Celery worker, beat, Flower, and an embedded Redis when none is around)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import typer

from app import logs
from app.netaddr import is_loopback
from app.settings import Settings, get_settings

log = logging.getLogger("app.api")


def register(app: typer.Typer) -> None:
    """Add the ``serve`` and ``up`` commands."""
    app.command("serve")(serve)
    app.command("up")(up)


@dataclass(frozen=True)
class BindCheck:
    """``serve``/``up``'s decision on the address to bind: ``refused`` says why not;
    ``note`` says why an open address is allowed."""

    refused: str | None = None
    note: str | None = None


def check_bind(settings: Settings, host: str) -> BindCheck:
    """May the server bind ``host`` (SPEC 4.10)? A loopback address, always. An open one
    only while a credential closes the server to anonymous callers -- the same rule the
    server applies to every request (``credentials.auth_enabled``): ``AUTONOMY_API_TOKEN``
    is set, or the database holds credentials minted with ``autonomy token create``
    (revoked ones too: revoking the last one keeps the server closed). The database is
    asked only without the token; one that cannot tell (down, not migrated) refuses,
    naming why."""
    from app.api.deps import configured_token
    from app.errors import Unavailable
    from app.ops import credentials

    if is_loopback(host):
        return BindCheck()
    if configured_token(settings) is not None:
        return BindCheck(note=f"serving on {host}: AUTONOMY_API_TOKEN is set, so every "
                              "change and every read of the fleet needs a credential")
    fix = ("Set AUTONOMY_API_TOKEN (the bootstrap operator credential), mint one with "
           "'autonomy token create --scope operator --name NAME', or bind a loopback "
           "address (127.0.0.1).")
    try:
        minted, live = credentials.stored(settings)
    except Unavailable as e:
        return BindCheck(refused=(
            f"refusing to serve on {host}: AUTONOMY_API_TOKEN is not set, and the database "
            f"could not be asked for credentials minted with 'autonomy token create' "
            f"({e.code}: {e.message}); without one, anyone who can reach it could change "
            f"the fleet. {fix}"))
    if minted == 0:
        return BindCheck(refused=(
            f"refusing to serve on {host} without a credential: AUTONOMY_API_TOKEN is not "
            f"set and the database holds none from 'autonomy token create', so anyone who "
            f"can reach it could change the fleet. {fix}"))
    unusable = " (none is live: nothing can use it until one is minted)" if not live else ""
    return BindCheck(note=(
        f"serving on {host} without AUTONOMY_API_TOKEN: the database holds {minted} "
        f"credential(s) from 'autonomy token create', {live} live, so every change and "
        f"every read of the fleet needs one{unusable}"))


def _bind_or_exit(settings: Settings, host: str) -> None:
    """Exit 2 naming why ``host`` may not be bound; else say why an open one may."""
    check = check_bind(settings, host)
    if check.refused is not None:
        typer.echo(f"error: {check.refused}", err=True)
        raise typer.Exit(2)
    if check.note is not None:
        typer.echo(f"note: {check.note}", err=True)


def serve(
    host: str | None = typer.Option(None, help="Address to bind (default AUTONOMY_API_HOST, "
                                    "127.0.0.1). Non-loopback needs a credential: "
                                    "AUTONOMY_API_TOKEN, or one from 'token create'."),
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
    _bind_or_exit(settings, h)
    # the bind address is one of the Host names the server answers to (SPEC 4.8)
    settings = settings.model_copy(update={"api_host": h})
    logs.configure(settings, process="api")
    if not access_log:
        logging.getLogger("app.api.access").setLevel(logging.WARNING)
    # log_config=None: uvicorn keeps its hands off logging (app.logs routes its lines);
    # its access log is off because app.api.request_log writes one with the request id
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), host=h, port=p, access_log=False, log_config=None, ws="none",
        lifespan="on"))
    refused = _belongs_here_or_later(settings, stop=lambda: setattr(server, "should_exit", True))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled
        server.run()
    if refused.is_set():
        raise typer.Exit(1)
    if not server.started:  # as uvicorn.run: the socket could not be bound, or the app
        raise typer.Exit(3)  # failed its start-up


def _belongs_here_or_later(settings: Settings, stop: Callable[[], None]) -> threading.Event:
    """The API's deployment check (SPEC 4.12). A mismatch found at start: exit 1 before
    serving. A database that cannot tell yet (down, not migrated): serve anyway -- /livez
    answers, /readyz says 503 naming the database -- while a thread keeps checking
    (``check_at_start``); a mismatch found then stops the server (``stop``), and ``serve``
    exits 1 (the returned event is set)."""
    from app.cli.output import fail
    from app.errors import DeploymentMismatch, Unavailable
    from app.ops import deployment

    refused = threading.Event()
    try:
        deployment.check(settings, "api")
        return refused
    except DeploymentMismatch as e:
        fail(e, False)
    except Unavailable as e:
        log.warning("api: cannot check which deployment the database belongs to yet (%s: "
                    "%s); serving, and checking again in the background", e.code, e.message)

    def later() -> None:
        try:
            deployment.check_at_start(settings, "api")
        except DeploymentMismatch as e:
            log.critical("%s: %s; stopping", e.code, e.message)
            refused.set()
            stop()

    threading.Thread(target=later, name="deployment-check", daemon=True).start()
    return refused


def up(
    demo: bool = typer.Option(False, "--demo", help="Seed demo lanes and run two demo "
                              "workers (one healthy, one that trips the breaker)."),
    no_flower: bool = typer.Option(False, "--no-flower", help="Do not start Flower."),
    host: str | None = typer.Option(None, help="API address (default AUTONOMY_API_HOST)."),
    port: int | None = typer.Option(None, min=0, max=65535,
                                    help="API port (default AUTONOMY_API_PORT)."),
    flower_port: int | None = typer.Option(None, min=0, max=65535,
                                           help="Flower port (default AUTONOMY_FLOWER_PORT)."),
    redis_port: int | None = typer.Option(None, min=1, max=65535,
                                          help="The embedded Redis's port (default: the one "
                                          "the last start from this data directory used, "
                                          "while free). Not with REDIS_URL."),
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
    _bind_or_exit(settings, h)
    sup = Supervisor(settings, host=h, port=port if port is not None else settings.api_port,
                     flower_port=flower_port if flower_port is not None
                     else settings.flower_port, flower=not no_flower, demo=demo,
                     redis_port=redis_port, raw_logs=raw_logs)
    raise typer.Exit(sup.run())
