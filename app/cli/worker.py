"""``autonomy worker --lane NAME [--concurrency N] -- CMD [ARGS...]``: consume a lane by
running CMD once per task (see ``app/workers/command.py`` for CMD's contract).

Locally the worker talks to the database and Redis of the environment's settings; with
``--url`` (and a token) it talks to a running server's API instead. SIGTERM/SIGINT stop
claiming and give running commands ``--grace`` seconds before they are killed and their
leases released; a second signal cuts the grace short.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
import time
from typing import Any

import typer

from app import logs
from app.cli.output import emit, fail, want_json
from app.errors import AutonomyError
from app.settings import get_settings
from app.workers.client import Client, HttpClient, LocalClient
from app.workers.command import CommandRunner
from app.workers.lane_worker import LaneWorker, WorkerStats, default_worker_name

log = logging.getLogger("app.workers.lane_worker")


def register(app: typer.Typer) -> None:
    """Add the ``worker`` command."""
    app.command("worker", context_settings={"ignore_unknown_options": True})(worker)


def worker(
    lane: str = typer.Option(..., "--lane", help="The lane (assignee) to consume."),
    cmd: list[str] = typer.Argument(..., metavar="-- CMD [ARGS...]",
                                    help="Run once per task; task JSON on stdin."),
    concurrency: int = typer.Option(1, min=1, max=64,
                                    help="Claiming loops, each named NAME-i."),
    name: str | None = typer.Option(None, "--name", help="Worker name (default: host-pid)."),
    timeout: float | None = typer.Option(None, min=0.001,
                                         help="Seconds per task before CMD is killed."),
    grace: float = typer.Option(30.0, min=0, help="Seconds a running CMD gets on shutdown."),
    url: str | None = typer.Option(None, envvar="AUTONOMY_URL",
                                   help="A running server's base URL (else: local)."),
    token: str | None = typer.Option(None, help="API token (default: AUTONOMY_API_TOKEN)."),
    max_tasks: int | None = typer.Option(None, min=1, help="Stop after N finished tasks."),
    heartbeat: float | None = typer.Option(None, min=0.01,
                                           help="Heartbeat seconds (default: lease TTL / 3)."),
    idle_max: float = typer.Option(2.0, min=0.01, help="Longest poll wait on an empty lane."),
    pause_max: float = typer.Option(30.0, min=0.01,
                                    help="Longest wait between claims on a paused lane."),
    prefetch: str = typer.Option("1", help="Leases each loop holds at once (claimed and "
                                           "completed in batches; 1: one at a time; auto: "
                                           "as many as its tasks run in ~50 ms, up to 10)."),
    as_json: bool | None = typer.Option(None, "--json", help="Print the summary as JSON."),
) -> None:
    """Consume a lane: run CMD once per task (exit 0 = success, else failure with the last
    stderr line as the validation reason), heartbeating the lease while it runs."""
    j = want_json(as_json)
    settings = get_settings()
    logs.configure(settings, process="lane-worker")
    stop, hurry = threading.Event(), threading.Event()
    client: Client
    if url:
        secret = token or (settings.api_token.get_secret_value() if settings.api_token else None)
        client = HttpClient(url, secret, settings=settings)
    else:
        from app.cli.db import belongs_here

        belongs_here(settings, "autonomy worker")  # the local database: this deployment's?
        client = LocalClient(settings=settings)
    base = name or default_worker_name()
    try:
        workers = [
            LaneWorker(lane, CommandRunner(cmd, timeout_s=timeout, grace_s=grace, hurry=hurry,
                                           result_max_bytes=settings.payload_max_bytes),
                       worker_name=base if concurrency == 1 else f"{base}-{i}", client=client,
                       heartbeat_interval_s=heartbeat, idle_backoff_s=(0.1, idle_max),
                       pause_backoff_s=(min(1.0, pause_max), pause_max),
                       prefetch=prefetch)
            for i in range(1, concurrency + 1)
        ]
    except AutonomyError as e:
        client.close()
        fail(e, j)
        return
    where = url or "local database"
    log.info("running %s (concurrency %d, %s)", shlex.join(cmd), concurrency, where,
             extra={"worker": base, "lane": workers[0].lane})
    try:
        errors = _run_all(workers, stop, hurry, max_tasks)
    finally:
        client.close()
    total = WorkerStats()
    for w in workers:
        for k, v in w.stats.as_dict().items():
            setattr(total, k, getattr(total, k) + v)
    if errors:
        fail(errors[0], j)
    emit({"ok": True, "worker": base, "lane": workers[0].lane,
          "workers": [w.name for w in workers], **total.as_dict()}, j,
         lambda a: f"worker {a['worker']} stopped: {a['succeeded']} succeeded, "
                   f"{a['failed']} failed, {a['released']} released, {a['lost']} lost")


def _run_all(workers: list[LaneWorker], stop: threading.Event, hurry: threading.Event,
             max_tasks: int | None) -> list[AutonomyError]:
    """Run each claiming loop in a thread until a signal, ``max_tasks``, or a fatal error."""
    errors: list[AutonomyError] = []

    def loop(w: LaneWorker) -> None:
        try:
            w.run(stop_event=stop, max_tasks=max_tasks if len(workers) == 1 else None)
        except AutonomyError as e:  # bad input, auth: waiting will not cure it
            errors.append(e)
            stop.set()
        except Exception as e:
            errors.append(AutonomyError(f"worker {w.name} crashed: {e!r}"))
            stop.set()

    def on_signal(signum: int, _frame: Any) -> None:
        sig = signal.Signals(signum).name
        fields = {"worker": workers[0].name, "lane": workers[0].lane}
        if stop.is_set():
            hurry.set()
            log.warning("%s again: killing running commands and releasing their leases", sig,
                        extra=fields)
        else:
            stop.set()
            log.warning("%s: no more claims; running commands get the grace period "
                        "(send it again to cut it short)", sig, extra=fields)

    before = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = [threading.Thread(target=loop, args=(w,), name=w.name) for w in workers]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if max_tasks is not None and len(workers) > 1 and not stop.is_set() \
                    and sum(w.stats.finished for w in workers) >= max_tasks:
                stop.set()
            time.sleep(0.1)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    return errors

