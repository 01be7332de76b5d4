"""The systems benches 8 and 9 compare, each as a worker process for ``bench.fleet`` plus
the parent's ``setup`` (schema) and ``enqueue``:

- ``autonomy``: a ``LaneWorker`` on one lane (``LocalClient``), no-op handler;
- ``pgqueuer``: ``QueueManager`` on asyncpg, ``batch_size`` 1 (and its default, 10);
- ``procrastinate``: a psycopg worker, concurrency 1, LISTEN/NOTIFY on;
- ``celery``: a ``--pool=solo`` worker, Redis broker under this run's key prefix.

Each peer gets a PostgreSQL database of its own (or, Celery, a Redis key prefix); the
optional ``bench`` extra installs them. Only the parent creates and drops databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from datetime import timedelta
from typing import Any

from bench.fleet import Recorder, Shared

# --- autonomy -------------------------------------------------------------------------


def autonomy_worker(cfg: dict[str, Any], name: str, shared: Shared) -> None:
    from app.settings import Settings
    from app.storage.context import Context
    from app.workers.client import LocalClient
    from app.workers.lane_worker import LaneWorker

    rec = Recorder(shared)
    ctx = Context.from_settings(Settings(**cfg["settings"]))
    client = LocalClient(ctx)

    def handler(task: dict[str, Any]) -> None:
        rec.ran(task["id"], task["payload"].get("seq"))

    worker = LaneWorker(cfg["lane"], handler, worker_name=name, client=client,
                        say=lambda _line: None, **cfg.get("worker_kw", {}))
    stop = threading.Event()
    try:
        client.claim("bench-warm", name)  # connect, load scripts
        rec.on_stop(stop.set)
        rec.started()
        worker.run(stop, handle_signals=False)
        rec.report()
    finally:
        ctx.close()


# --- pgqueuer -------------------------------------------------------------------------


async def pgqueuer_setup(dsn: str) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def pgqueuer_enqueue(dsn: str, n: int, *, first_seq: int = 0) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    try:
        q = Queries(AsyncpgDriver(conn))
        for lo in range(0, n, 1000):
            k = min(1000, n - lo)
            await q.enqueue(["noop"] * k,
                            [str(first_seq + lo + i).encode() for i in range(k)], [0] * k)
    finally:
        await conn.close()


def pgqueuer_worker(cfg: dict[str, Any], name: str, shared: Shared) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    rec = Recorder(shared)

    async def main() -> None:
        conn = await asyncpg.connect(cfg["dsn"])
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            rec.ran(job.id, int(job.payload.decode()) if cfg.get("pickup") else None)

        loop = asyncio.get_running_loop()
        rec.on_stop(lambda: loop.call_soon_threadsafe(qm.shutdown.set))
        await loop.run_in_executor(None, rec.started)
        await qm.run(batch_size=cfg["batch_size"], mode=QueueExecutionMode.continuous,
                     dequeue_timeout=timedelta(seconds=30))
        await conn.close()

    asyncio.run(main())
    rec.report()


# --- procrastinate --------------------------------------------------------------------


def _procrastinate_app(dsn: str) -> Any:
    import procrastinate

    return procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=dsn, min_size=1, max_size=2))


def procrastinate_setup(dsn: str) -> None:
    app = _procrastinate_app(dsn)
    with app.open():
        app.schema_manager.apply_schema()


def procrastinate_enqueue(dsn: str, n: int) -> None:
    app = _procrastinate_app(dsn)
    noop = app.task(name="noop", queue="bench")(lambda seq: None)
    with app.open():
        for lo in range(0, n, 1000):
            noop.batch_defer(*({"seq": lo + i} for i in range(min(1000, n - lo))))


def procrastinate_worker(cfg: dict[str, Any], name: str, shared: Shared) -> None:
    rec = Recorder(shared)
    app = _procrastinate_app(cfg["dsn"])

    @app.task(name="noop", queue="bench", pass_context=True)
    def noop(context: Any, seq: int) -> None:
        rec.ran(context.job.id)

    async def main() -> None:
        async with app.open_async():
            loop = asyncio.get_running_loop()
            task = asyncio.create_task(app.run_worker_async(
                queues=["bench"], concurrency=1, wait=True, install_signal_handlers=False,
                listen_notify=True, delete_jobs="never"))
            rec.on_stop(lambda: loop.call_soon_threadsafe(task.cancel))
            await loop.run_in_executor(None, rec.started)
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())
    rec.report()


# --- celery ---------------------------------------------------------------------------


def _celery_app(cfg: dict[str, Any]) -> Any:
    from celery import Celery

    app = Celery("bench-peer", set_as_current=False)
    app.conf.update(
        broker_url=cfg["redis_url"],
        broker_transport_options={"global_keyprefix": cfg["prefix"]},
        task_ignore_result=True, worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
        task_default_queue=cfg["queue"], accept_content=["json"], task_serializer="json")
    return app


def celery_enqueue(cfg: dict[str, Any], n: int, *, first_seq: int = 0) -> None:
    app = _celery_app(cfg)
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task("noop", args=(first_seq + i,), queue=cfg["queue"],
                          producer=producer)
    app.close()


def celery_worker(cfg: dict[str, Any], name: str, shared: Shared) -> None:
    rec = Recorder(shared)
    app = _celery_app(cfg)

    @app.task(name="noop")
    def noop(seq: int) -> None:
        rec.ran(seq, seq if cfg.get("pickup") else None)

    def stop() -> None:
        rec.report()
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown

    worker = app.Worker(pool="solo", concurrency=1, queues=[cfg["queue"]], loglevel="ERROR",
                        without_heartbeat=True, without_gossip=True, without_mingle=True,
                        quiet=True, hostname=f"{name}@bench")
    with app.connection_for_write() as conn:  # connect first, as the others do
        conn.ensure_connection(max_retries=3)
    rec.on_stop(stop)
    rec.started()
    worker.start()
