"""``autonomy up``: the supervisor that runs the whole thing locally.

Applies the migrations, settles on a Redis (``app.local.embedded_redis``: the configured one, one
already listening locally, or an embedded ``redis-server`` it starts), then runs the API,
a Celery worker, beat and Flower (and, with ``--demo``, the demo's lane workers) as child
processes with the effective ``REDIS_URL`` / ``DATABASE_URL`` in their environment. Their
output is prefixed with their name. On SIGINT/SIGTERM every child's process group is
terminated, waited for, and killed after a grace period, so nothing is left behind; the
embedded Redis stops last, after the processes that use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

from app.errors import AutonomyError
from app.local.embedded_redis import RedisChoice, choose, safe_url, start_embedded
from app.ops import schema
from app.settings import Settings

POLL_S = 0.2


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    critical: bool = True
    proc: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Start everything, wait for a signal, stop everything."""

    def __init__(self, settings: Settings, *, host: str, port: int, flower_port: int,
                 flower: bool = True, demo: bool = False, out: IO[str] | None = None) -> None:
        self.settings = settings
        self.host, self.port, self.flower_port = host, port, flower_port
        self.flower, self.demo = flower, demo
        self.out = out or sys.stdout
        self.children: list[Child] = []
        self.redis_child: Child | None = None
        self.stop_signal: int | None = None
        self._lock = threading.Lock()

    # --- output ---------------------------------------------------------------------

    def say(self, line: str) -> None:
        """One line of ``up``'s own."""
        with self._lock:
            self.out.write(f"autonomy up: {line}\n")
            self.out.flush()

    def _pump(self, name: str, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self.out.write(f"{name:>14} | {line.rstrip()}\n")
                self.out.flush()

    # --- the run ------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGINT/SIGTERM (exit 0) or until a critical child dies (exit 1)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        except AutonomyError as e:
            self.say(f"error: {e.code}: {e.message}")
            return 3
        finally:
            self.stop_all()
            for s, h in old.items():
                signal.signal(s, h)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop waiting politely
            self._kill_all()
        self.stop_signal = signum

    def _run(self) -> int:
        s = self.settings
        schema.upgrade(s.database_url)
        self.say(f"database {safe_url(s.database_url)} (migrated)")
        choice = choose(s)
        if choice.argv is not None:
            self._start_redis(choice)
        self.say(f"redis    {safe_url(choice.url)} ({choice.how})")
        effective = s.model_copy(update={"redis_url": choice.url})
        env = self._env(choice.url)
        if self.demo:
            self._seed_demo(effective)
        for child in self._plan(effective):
            if self.stop_signal is not None:  # Ctrl-C while starting up
                return 0
            self._start(child, env)
        if not self._wait_ready():
            return 0 if self.stop_signal is not None else 1
        self.say("ready: Ctrl-C stops everything")
        return self._watch()

    def _env(self, redis_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(REDIS_URL=redis_url, AUTONOMY_REDIS_URL=redis_url,
                   DATABASE_URL=self.settings.database_url,
                   AUTONOMY_DATABASE_URL=self.settings.database_url, PYTHONUNBUFFERED="1")
        if self.settings.flower_basic_auth:
            env["FLOWER_BASIC_AUTH"] = self.settings.flower_basic_auth
        return env

    def _plan(self, effective: Settings) -> list[Child]:
        py, s = sys.executable, self.settings
        celery = [py, "-m", "celery", "-A", "app.celery_app"]
        data = os.path.abspath(s.data_dir)
        os.makedirs(data, exist_ok=True)
        plan = [
            Child("api", [py, "-m", "app.cli", "serve", "--host", self.host,
                          "--port", str(self.port), "--no-access-log"]),
            Child("worker", [*celery, "worker", "--loglevel", "INFO", "-E",
                             "--hostname", f"autonomy-{os.getpid()}@%h"]),
            Child("beat", [*celery, "beat", "--loglevel", "INFO",
                           "--schedule", os.path.join(data, "celerybeat-schedule")]),
        ]
        if self.flower:
            from app.local.flower import flower_argv

            address = self.host if s.flower_basic_auth else "127.0.0.1"
            # the credentials reach Flower through FLOWER_BASIC_AUTH (see _env), never argv,
            # where `ps` would show them
            plan.append(Child("flower", flower_argv(address=address, port=self.flower_port)))
        if self.demo:
            from app.local.demo import worker_commands

            for i, argv in enumerate(worker_commands(effective)):
                name = argv[argv.index("--name") + 1] if "--name" in argv else f"demo-{i + 1}"
                plan.append(Child(name, argv, critical=False))
        return plan

    def _start_redis(self, choice: RedisChoice) -> None:
        proc = start_embedded(choice, self.settings.up_ready_timeout_s)
        self.redis_child = Child("redis", choice.argv or [], proc=proc)
        self._read(self.redis_child)

    def _seed_demo(self, effective: Settings) -> None:
        from app.local.demo import seed
        from app.storage.context import Context

        ctx = Context.from_settings(effective)
        try:
            answer = seed(ctx)
        finally:
            ctx.close()
        made = ", ".join(f"{n} in {lane}" for lane, n in answer.get("created", {}).items())
        self.say(f"demo     lanes {', '.join(answer.get('lanes', []))} seeded ({made or 'full'})")

    def _start(self, child: Child, env: dict[str, str]) -> None:
        child.proc = subprocess.Popen(child.argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True, errors="replace", bufsize=1,
                                      start_new_session=True)
        self.children.append(child)
        self._read(child)

    def _read(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        child.reader = threading.Thread(target=self._pump, args=(child.name, child.proc.stdout),
                                        name=f"up-{child.name}", daemon=True)
        child.reader.start()

    def _wait_ready(self) -> bool:
        """Say where each child listens once it does; False if stopped or one died."""
        deadline = time.monotonic() + self.settings.up_ready_timeout_s
        waiting = {"api": (self.host, self.port)}
        if self.flower:
            waiting["flower"] = ("127.0.0.1" if not self.settings.flower_basic_auth
                                 else self.host, self.flower_port)
        for child in self.children:
            assert child.proc is not None
            if child.name not in waiting:
                self.say(f"{child.name:<8} pid {child.proc.pid}")
        while waiting:
            if self.stop_signal is not None:
                return False
            dead = self._dead()
            if dead is not None:
                assert dead.proc is not None
                self.say(f"error: {dead.name} exited with code {dead.proc.returncode} "
                         "before it was ready")
                return False
            for name, (h, p) in list(waiting.items()):
                if _listening(_url_host(h).strip("[]"), p):
                    del waiting[name]
                    self.say(f"{name:<8} http://{_url_host(h)}:{p}/"
                             + ("  (control panel; API at /api/autonomy, docs at /docs)"
                                if name == "api" else ""))
            if time.monotonic() > deadline:
                self.say(f"error: not listening after {self.settings.up_ready_timeout_s:g}s: "
                         + ", ".join(waiting))
                return False
            time.sleep(POLL_S)
        return True

    def _dead(self) -> Child | None:
        for child in [*self.children, *([self.redis_child] if self.redis_child else [])]:
            if child.critical and child.proc is not None and child.proc.poll() is not None:
                return child
        return None

    def _watch(self) -> int:
        gone: set[str] = set()
        while self.stop_signal is None:
            dead = self._dead()
            if dead is not None:
                assert dead.proc is not None
                self.say(f"error: {dead.name} exited with code {dead.proc.returncode}; "
                         "stopping everything")
                return 1
            for child in self.children:
                if not child.critical and child.name not in gone and child.proc is not None \
                        and child.proc.poll() is not None:
                    gone.add(child.name)
                    self.say(f"{child.name} exited with code {child.proc.returncode}")
            time.sleep(POLL_S)
        self.say(f"{signal.Signals(self.stop_signal).name}: stopping")
        return 0

    # --- stopping ------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Terminate every child group, wait, kill what is left; the Redis last."""
        _stop_group([c for c in reversed(self.children) if c.proc is not None],
                    self.settings.up_stop_grace_s)
        if self.redis_child is not None:
            _stop_group([self.redis_child], self.settings.up_stop_grace_s)
        for child in [*self.children, *([self.redis_child] if self.redis_child else [])]:
            if child.reader is not None:
                child.reader.join(timeout=2)
        if self.children or self.redis_child:
            self.say("stopped")
        self.children, self.redis_child = [], None

    def _kill_all(self) -> None:
        for child in [*self.children, *([self.redis_child] if self.redis_child else [])]:
            if child.proc is not None:
                _signal_group(child.proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    # each child leads its own session (start_new_session), so its group id is its pid;
    # signalling the group reaches its own children too (Celery's pool processes)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop_group(children: list[Child], grace_s: float) -> None:
    # SIGTERM goes to each leader only, so it shuts down its own children in order (a
    # Celery worker its pool, `autonomy worker` its commands); the group is killed when
    # the grace period runs out, and once more after the leader exits, for stragglers
    for child in children:
        assert child.proc is not None
        if child.proc.poll() is None:
            child.proc.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        assert child.proc is not None
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()
        _signal_group(child.proc, signal.SIGKILL)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
