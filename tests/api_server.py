"""A real HTTP server for the API tests: uvicorn serving ``create_app(ctx=...)`` in a
thread on a free loopback port (real sockets, real HTTP, no test-client shortcuts)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI

from app.api.app import create_app
from app.storage.context import Context
from tests.servers import free_port


class ServerThread:
    """uvicorn in a daemon thread; ``stop()`` asks it to exit and joins it. ``port``: a
    given one (a server started again where the last one listened), else a free one."""

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, ws="none", http="h11", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def serve(ctx: Context) -> Iterator[ServerThread]:
    """Serve the app over ``ctx`` for the duration of the block."""
    server = ServerThread(create_app(ctx=ctx)).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def client(ctx: Context, token: str | None = None) -> Iterator[httpx.Client]:
    """An HTTP client to a server over ``ctx`` (with a bearer token when given)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with serve(ctx) as server, httpx.Client(base_url=server.url, headers=headers,
                                            timeout=30) as http:
        yield http
