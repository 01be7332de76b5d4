"""``autonomy up``: the supervisor that runs the whole thing locally.

Checks that its ports are free (``port in use``: exit 2), applies the migrations, settles
on a Redis (``app.local.embedded_redis``: ``REDIS_URL`` when set, else an embedded
``redis-server`` it starts), runs every periodic check once (so nothing reads "missing"
until beat's first period), then runs the API, a Celery worker, beat and Flower (and, with
``--demo``, the demo's lane workers) as child processes with the effective ``REDIS_URL`` /
``DATABASE_URL`` in their environment. Their output is prefixed with their name, or passed
through untouched with ``raw_logs`` (the default with ``AUTONOMY_LOG_FORMAT=json``, where
``up``'s own lines are JSON too: the whole output is one JSON object a line). A child
that exits once the stack is ready is started again after a backoff (1 s doubling, said in
one line); only a child that keeps dying at startup stops the stack. The embedded Redis is
supervised too: when it dies it is started again at once on the same port and data
directory, said in one line with its exit code or signal (the other children reconnect
to it; SPEC 4.7), and a Redis that keeps dying at startup stops the stack.

Ready means the API child answers ``GET /livez`` with the nonce this start gave it (not
merely that something accepts connections on the port) and Flower answers its
``/healthcheck``. Then ``up`` prints the panel, API and Flower URLs and one line to paste
into a second terminal. On SIGINT/SIGTERM every child's process group is terminated,
waited for, and killed after a grace period, so nothing is left behind; the embedded Redis
stops last, after the processes that use it."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

from app import logs
from app.errors import AutonomyError, DeploymentMismatch, PortInUse
from app.local.embedded_redis import RedisChoice, choose, safe_url, start_embedded
from app.ops import deployment, schema
from app.settings import Settings

POLL_S = 0.2
# the demo's visible run-lock: readiness (every 60 s, budget 30 s) holds its lock 25 s a
# run, so the panel and Flower show a real lock's elapsed time climbing against its budget
DEMO_JOB_MIN_RUNTIME_MS = {"readiness": 25_000}


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    critical: bool = True
    proc: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = field(default=None, repr=False)
    env: dict[str, str] | None = field(default=None, repr=False)
    started_at: float = 0.0  # time.monotonic() of its last start
    quick_deaths: int = 0  # exits in a row within up_child_min_uptime_s of starting
    restarts: int = 0
    restart_at: float | None = None  # when a restart is due (after its backoff)


class Supervisor:
    """Start everything, wait for a signal, stop everything."""

    def __init__(self, settings: Settings, *, host: str, port: int, flower_port: int,
                 flower: bool = True, demo: bool = False, out: IO[str] | None = None,
                 redis_port: int | None = None, raw_logs: bool | None = None) -> None:
        self.settings = settings
        self.json_logs = settings.log_format == "json"
        self.raw_logs = self.json_logs if raw_logs is None else raw_logs
        self.host, self.port, self.flower_port = host, port, flower_port
        self.flower, self.demo = flower, demo
        self.out = out or sys.stdout
        self.children: list[Child] = []
        self.redis_child: Child | None = None
        self.redis_port = redis_port
        self._redis_choice: RedisChoice | None = None
        self.stop_signal: int | None = None
        self.nonce = os.urandom(8).hex()
        self.redis_url: str | None = None
        self._lock = threading.Lock()
        # the children's output is held back until everything is ready (so the ready lines
        # are not lost among start-up banners), then kept in a file; shown if start fails
        self._ready = False
        self._held: list[str] = []

    # --- output ---------------------------------------------------------------------

    def say(self, line: str) -> None:
        """One line of ``up``'s own."""
        with self._lock:
            self.out.write(self._own(line))
            self.out.flush()

    def _own(self, line: str) -> str:
        if self.json_logs:
            level = logging.ERROR if line.startswith("error:") else logging.INFO
            return logs.json_line(line, logger="app.local.up", level=level) + "\n"
        return f"autonomy up: {line}\n"

    def _pump(self, name: str, stream: IO[str]) -> None:
        with stream:  # closed at EOF: a restarted child gets a new pipe
            for line in stream:
                text = (line.rstrip("\n") + "\n" if self.raw_logs
                        else f"{name:>14} | {line.rstrip()}\n")
                with self._lock:
                    if self._ready:
                        self.out.write(text)
                        self.out.flush()
                    else:
                        self._held.append(text)

    def _show_held(self) -> None:
        """Start failed or was stopped: print what the children said, from here on live."""
        with self._lock:
            self.out.writelines(self._held)
            self.out.flush()
            self._held, self._ready = [], True

    def _say_ready(self, lines: list[str]) -> None:
        """Keep the held start-up output in a file, print the ready lines, go live."""
        path = os.path.join(os.path.abspath(self.settings.data_dir), "up-start.log")
        with self._lock:
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(self._held)
            n, self._held, self._ready = len(self._held), [], True
            for line in [*lines, f"start-up output of the children ({n} lines): {path}"]:
                self.out.write(self._own(line))
            self.out.flush()

    # --- the run ------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGINT/SIGTERM (exit 0), or exit 1 when a child dies before the stack
        is ready, or keeps dying right after each restart. Once ready, a child that exits
        is restarted with backoff, the embedded Redis at once, each said in one line."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        except AutonomyError as e:
            from app.cli.output import exit_code

            self._show_held()
            self.say(f"error: {e.code}: {e.message}")
            return exit_code(e)  # 2 for a port in use, 3 for a database or Redis down
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
        self._check_ports()
        schema.upgrade(s.database_url)
        self.say(f"database {safe_url(absolute_db_url(s.database_url))} (migrated)")
        choice = choose(s, self.redis_port)
        if choice.ignored is not None:
            self.say(f"redis    not using the Redis listening at {safe_url(choice.ignored)} "
                     f"(set REDIS_URL={safe_url(choice.ignored)} to use it)")
        effective = s.model_copy(update={"redis_url": choice.url})
        # before anything starts: a database that belongs to another deployment (another
        # up's Redis, another prefix) is refused, naming both (SPEC 4.12)
        try:
            deployment.check(effective, "autonomy up")
        except DeploymentMismatch as e:
            if choice.last_port_taken is not None:
                e.message += (f" (the embedded Redis's port of the last start, "
                              f"{choice.last_port_taken}, is taken by another process, so "
                              f"this start picked {choice.port}: free it, or give "
                              f"--redis-port {choice.last_port_taken} once it is free)")
            raise
        if choice.argv is not None:
            self._check_redis_port(choice)
            self._start_redis(choice)
        self.say(f"redis    {safe_url(choice.url)} ({choice.how})")
        self.redis_url = choice.url
        env = self._env(choice.url)
        if self.demo:
            self._seed_demo(effective)
        self._run_checks_once(effective)
        for child in self._plan(effective):
            if self.stop_signal is not None:  # Ctrl-C while starting up
                return 0
            self._start(child, env)
        if not self._wait_ready():
            self._show_held()
            return 0 if self.stop_signal is not None else 1
        self._say_ready(self._ready_lines())
        return self._watch()

    def _check_redis_port(self, choice: RedisChoice) -> None:
        """Refuse, before starting anything, an API or Flower port that is the embedded
        Redis's own (the port its data directory comes back on): free when checked, it
        would be Redis's a moment later, and the API would fail to bind."""
        clash = {"api": self.port, "flower": self.flower_port if self.flower else None}
        for name, port in clash.items():
            if port is not None and port == choice.port:
                option = {"api": "port"}.get(name, f"{name}-port")
                raise PortInUse(f"port in use: {name} cannot listen on port {port}, the "
                                f"embedded Redis's port (its data directory's, "
                                f"{choice.data_dir}); pick another port (--{option}), or "
                                f"give Redis another (--redis-port)", port=port)

    def _check_ports(self) -> None:
        """Refuse, before starting anything, a port another process holds."""
        wanted = [("api", self.host, self.port)]
        if self.flower:
            wanted.append(("flower", self._flower_host(), self.flower_port))
        if self.redis_port is not None and not self.settings.redis_url:
            wanted.append(("redis", "127.0.0.1", self.redis_port))
        for name, host, port in wanted:
            why = _port_taken(_url_host(host).strip("[]"), port)
            if why is not None:
                option = {"api": "port"}.get(name, f"{name}-port")
                raise PortInUse(f"port in use: {name} cannot listen on {_url_host(host)}:{port} "
                                f"({why}); stop what holds it or pick another port "
                                f"(--{option})", port=port)

    def _flower_host(self) -> str:
        return self.host if self.settings.flower_basic_auth else "127.0.0.1"

    def _run_checks_once(self, effective: Settings) -> None:
        """Every periodic check once, now, inline (under its run-lock), so the panel shows
        real handoff, readiness and job runs from the start instead of "missing"."""
        from app.ops.checks.jobs import JOB_NAMES, run_job
        from app.ops.run_locks import break_dead, holder_name
        from app.storage.context import Context  # a face builds its context (as _seed_demo)

        ctx = Context.from_settings(effective.model_copy(update={"job_min_runtime_ms": {}}))
        said = []
        try:
            broken = [lk["job"] for lk in break_dead(ctx)]
            if broken:
                self.say(f"run-locks released (their holders died with the last stop): "
                         f"{', '.join(broken)}")
            for job in JOB_NAMES:
                try:
                    answer = run_job(ctx, job, holder=holder_name("up"))
                except AutonomyError as e:
                    said.append(f"{job} {e.code}")
                    continue
                state = answer.get("state") or answer.get("skipped")
                said.append(f"{job} {state}" if state else f"{job} ok")
        finally:
            ctx.close()
        self.say(f"checks   ran once at start: {', '.join(said)}")

    def _ready_lines(self) -> list[str]:
        api = f"http://{_url_host(self.host)}:{self.port}"
        lines = ["ready",
                 f"  panel   {api}/",
                 f"  API     {api}/api/autonomy  (docs {api}/docs, probes /livez /readyz)"]
        if self.flower:
            lines.append(f"  Flower  http://{_url_host(self._flower_host())}:{self.flower_port}/")
        lines.append(f"  second terminal: {self.second_terminal()}")
        lines.append("Ctrl-C stops everything; from here on the children's output follows")
        return lines

    def second_terminal(self) -> str:
        """One line to paste into another shell: the venv and the URLs of this run."""
        exports = {"REDIS_URL": self.redis_url or self.settings.effective_redis_url,
                   "DATABASE_URL": absolute_db_url(self.settings.database_url)}
        if self.settings.redis_prefix != "autonomy:":
            exports["AUTONOMY_REDIS_PREFIX"] = self.settings.redis_prefix
        line = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items())
        if sys.prefix != sys.base_prefix:  # running from a virtualenv
            line = f". {shlex.quote(os.path.join(sys.prefix, 'bin', 'activate'))} && {line}"
        return line

    def _env(self, redis_url: str) -> dict[str, str]:
        env = dict(os.environ)
        db_url = absolute_db_url(self.settings.database_url)
        env.update(REDIS_URL=redis_url, AUTONOMY_REDIS_URL=redis_url, DATABASE_URL=db_url,
                   AUTONOMY_DATABASE_URL=db_url, PYTHONUNBUFFERED="1",
                   AUTONOMY_START_NONCE=self.nonce)
        if self.demo and not self.settings.job_min_runtime_ms:
            env["AUTONOMY_JOB_MIN_RUNTIME_MS"] = json.dumps(DEMO_JOB_MIN_RUNTIME_MS)
        if self.settings.flower_basic_auth:
            env["FLOWER_BASIC_AUTH"] = self.settings.flower_basic_auth
        return env

    def _plan(self, effective: Settings) -> list[Child]:
        py, s = sys.executable, self.settings
        # --quiet: no start-up banners, so the ready lines are not lost among them
        celery = [py, "-m", "celery", "-A", "app.celery_app", "--quiet"]
        data = os.path.abspath(s.data_dir)
        os.makedirs(data, exist_ok=True)
        plan = [
            Child("api", [py, "-m", "app.cli", "serve", "--host", self.host,
                          "--port", str(self.port), "--no-access-log"]),
            # --without-gossip: one worker has no peers to gossip with, and Celery's gossip
            # step logs a 100-line traceback each time the broker connection drops (the
            # embedded Redis restarted): the one line `up` says is enough
            Child("worker", [*celery, "worker", "--loglevel", "INFO", "-E", "--without-gossip",
                             "--hostname", f"autonomy-{os.getpid()}@%h"]),
            Child("beat", [*celery, "beat", "--loglevel", "INFO",
                           "--schedule", os.path.join(data, "celerybeat-schedule")]),
        ]
        if self.flower:
            from app.local.flower import flower_argv

            address = self._flower_host()
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
        self._redis_choice = choice
        self.redis_child = Child("redis", choice.argv or [], proc=proc,
                                 started_at=time.monotonic())
        self._read(self.redis_child)

    def _restart_redis(self, redis_child: Child) -> bool:
        """The embedded Redis exited: say so in one line (with its exit code or signal)
        and start it again at once on the same port and data directory; False when it
        keeps dying at startup (as a child would, see ``_schedule_restart``)."""
        s, choice = self.settings, self._redis_choice
        assert redis_child.proc is not None and choice is not None
        how = exit_description(redis_child.proc.returncode)
        if time.monotonic() - redis_child.started_at < s.up_child_min_uptime_s:
            redis_child.quick_deaths += 1
        else:
            redis_child.quick_deaths = 0
        if redis_child.quick_deaths >= s.up_child_max_quick_deaths:
            self.say(f"error: redis exited ({how}) and keeps dying at startup "
                     f"({redis_child.quick_deaths} times in a row within "
                     f"{s.up_child_min_uptime_s:g}s of starting); stopping everything")
            return False
        redis_child.restarts += 1
        self.say(f"redis exited ({how}); restarting it on {choice.url} with its data in "
                 f"{choice.data_dir} (restart {redis_child.restarts})")
        if redis_child.reader is not None:
            redis_child.reader.join(timeout=2)
        redis_child.proc = start_embedded(choice, s.up_ready_timeout_s)
        redis_child.started_at = time.monotonic()
        self._read(redis_child)
        return True

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
        child.env = env
        self._spawn(child)
        self.children.append(child)

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.argv, env=child.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      text=True, errors="replace", bufsize=1,
                                      start_new_session=True)
        child.started_at = time.monotonic()
        self._read(child)

    def _read(self, child: Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        child.reader = threading.Thread(target=self._pump, args=(child.name, child.proc.stdout),
                                        name=f"up-{child.name}", daemon=True)
        child.reader.start()

    def _wait_ready(self) -> bool:
        """Say where each child listens once it answers over HTTP -- the API its /livez
        with this start's nonce, Flower its /healthcheck; False if stopped or one died."""
        deadline = time.monotonic() + self.settings.up_ready_timeout_s
        waiting = {"api": (self.host, self.port)}
        if self.flower:
            waiting["flower"] = (self._flower_host(), self.flower_port)
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
                self._show_held()  # what it said before it died, then why we stop
                self.say(f"error: {dead.name} exited "
                         f"({exit_description(dead.proc.returncode)}) before it was ready")
                return False
            for name, (h, p) in list(waiting.items()):
                if self._answers(name, f"http://{_url_host(h)}:{p}"):
                    del waiting[name]
                    self.say(f"{name:<8} http://{_url_host(h)}:{p}/"
                             + ("  (control panel; API at /api/autonomy, docs at /docs)"
                                if name == "api" else ""))
            if time.monotonic() > deadline:
                self._show_held()
                self.say(f"error: not listening after {self.settings.up_ready_timeout_s:g}s: "
                         + ", ".join(waiting))
                return False
            time.sleep(POLL_S)
        return True

    def _answers(self, name: str, base: str) -> bool:
        if name == "api":
            body = _get_json(f"{base}/livez")
            return body is not None and body.get("nonce") == self.nonce
        return _get_json(f"{base}/healthcheck", raw=True) is not None

    def _dead(self, *, children: bool = True) -> Child | None:
        for child in [*(self.children if children else []),
                      *([self.redis_child] if self.redis_child else [])]:
            if child.critical and child.proc is not None and child.proc.poll() is not None:
                return child
        return None

    def _watch(self) -> int:
        """Restart a child that exits (with backoff, said in one line) until a signal;
        a child that keeps dying right after it starts stops everything (exit 1)."""
        while self.stop_signal is None:
            for child in self.children:
                if child.proc is None or child.proc.poll() is None:
                    continue
                if child.restart_at is None:
                    if not self._schedule_restart(child):
                        return 1
                elif time.monotonic() >= child.restart_at:
                    child.restart_at = None
                    child.restarts += 1
                    if child.reader is not None:
                        child.reader.join(timeout=2)
                    self._spawn(child)
            dead = self._dead(children=False)
            # the embedded Redis: at once, the others wait on it (they reconnect by themselves)
            if dead is not None and not self._restart_redis(dead):
                return 1
            time.sleep(POLL_S)
        self.say(f"{signal.Signals(self.stop_signal).name}: stopping")
        return 0

    def _schedule_restart(self, child: Child) -> bool:
        """Say that ``child`` exited and when it restarts; False when it keeps dying at
        startup (``up_child_max_quick_deaths`` exits in a row, each within
        ``up_child_min_uptime_s`` of its start)."""
        s = self.settings
        assert child.proc is not None
        how = exit_description(child.proc.returncode)
        if time.monotonic() - child.started_at < s.up_child_min_uptime_s:
            child.quick_deaths += 1
        else:
            child.quick_deaths = 0
        if child.quick_deaths >= s.up_child_max_quick_deaths:
            self.say(f"error: {child.name} keeps dying at startup ({how}, "
                     f"{child.quick_deaths} times in a row within "
                     f"{s.up_child_min_uptime_s:g}s of starting); stopping everything")
            return False
        delay = min(s.up_restart_backoff_max_s,
                    s.up_restart_backoff_first_s * 2 ** max(0, child.quick_deaths - 1))
        child.restart_at = time.monotonic() + delay
        self.say(f"{child.name} exited ({how}); restarting it in {delay:g}s "
                 f"(restart {child.restarts + 1})")
        return True

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


def exit_description(returncode: int) -> str:
    """``signal 9`` for a process a signal ended, else ``code 0``."""
    return f"signal {-returncode}" if returncode < 0 else f"code {returncode}"


def _port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use), or None. SO_REUSEADDR as the
    servers set it, so a port in TIME_WAIT is not taken for one in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "another process listens there"
            return e.strerror or str(e)
    return None


def _get_json(url: str, *, raw: bool = False) -> dict[str, Any] | None:
    """The JSON object (or, ``raw``, an empty dict for any 200) ``url`` answers, or None
    when it does not answer 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            if resp.status != 200:
                return None
            if raw:
                return {}
            body = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return body if isinstance(body, dict) else None


def absolute_db_url(url: str) -> str:
    """A relative SQLite path made absolute (so the URL works from any directory)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
        path = url[len(prefix):]
        if path and not path.startswith(":memory:"):
            return prefix + os.path.abspath(path)
    return url


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
