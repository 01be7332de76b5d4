"""One log format for every process: the API, the Celery worker and beat, Flower,
``autonomy worker`` and ``autonomy up``.

``configure(settings, process=...)`` puts one handler on the root logger, writing to
stderr: a readable line by default (``AUTONOMY_LOG_FORMAT=text``), one JSON object per
line with ``AUTONOMY_LOG_FORMAT=json``::

    2026-11-30T00:01:02.345Z INFO  lane-worker app.workers.lane_worker: task 7: done  task_id=7 ...
    {"timestamp": "2026-11-30T00:01:02.345Z", "level": "info", "logger":
     "app.workers.lane_worker", "message": "task 7: done", "process": "lane-worker",
     "pid": 4242, "task_id": 7, "lane": "coder", "worker": "w1"}

The field names are the usual ones (``timestamp``, ``level``, ``logger``, ``message``, and
``exception`` for a traceback), so a log shipper needs no renaming. ``process`` names the
role (``PROCESSES``): ``api``, ``celery-worker``, ``celery-beat``, ``flower``,
``lane-worker``, ``up``, ``cli``.

Context fields (``request_id``, ``task_id``, ``lane``, ``worker``, ``task_name``) come from
``bound(...)`` / ``bind(...)`` (context variables, so each request, thread or task sees its
own) or from a call's ``extra=``; a line that names a task always carries ``task_id``,
``lane`` and ``worker`` (null when one does not apply: a Celery check job has no lane).
Celery's own "Task ... received/succeeded" lines name their task in their arguments; they
get its ``task_id`` too.

Why the standard library and not structlog: every library here (Celery, kombu, uvicorn,
alembic) logs through ``logging``, so their lines have to pass through a ``logging``
handler in any case; with structlog we would still need this handler (its
``ProcessorFormatter``) plus a second API for our own calls. One ``Formatter`` and one
``Filter`` give every line -- ours and theirs -- the same shape, with no new dependency.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

from app.settings import Settings, get_settings

# the roles a line's "process" names
PROCESSES = ("api", "celery-worker", "celery-beat", "flower", "lane-worker", "up", "cli")
CONTEXT_FIELDS = ("request_id", "task_id", "lane", "worker", "task_name")
TASK_FIELDS = ("task_id", "lane", "worker")

_fields: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "autonomy_log_fields", default=None)
_process: dict[str, Any] = {"name": "autonomy", "defaults": {}}

# attributes every LogRecord has: anything else on a record came from ``extra=``
# (uvicorn's ``color_message`` is its message again, with terminal colour codes)
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime",
                                                             "taskName", "color_message"}


def bind(**fields: Any) -> contextvars.Token[Mapping[str, Any] | None]:
    """Add fields to every line logged in this context until ``unbind(token)``."""
    return _fields.set({**(_fields.get() or {}), **fields})


def unbind(token: contextvars.Token[Mapping[str, Any] | None]) -> None:
    """Undo one ``bind``."""
    _fields.reset(token)


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add fields to every line logged inside the block (in this thread or task)."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def set_process_fields(**fields: Any) -> None:
    """Fields of the whole process (e.g. a Celery worker's ``worker`` name), under any
    bound ones."""
    _process["defaults"] = {**_process["defaults"], **fields}


class ContextFilter(logging.Filter):
    """Puts the bound fields on each record (a call's own ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in {**_process["defaults"], **(_fields.get() or {})}.items():
            if not hasattr(record, k):
                setattr(record, k, v)
        if not hasattr(record, "task_id") and record.name.startswith("celery") \
                and isinstance(record.args, Mapping) and "id" in record.args:
            record.task_id = record.args["id"]  # "Task %(name)s[%(id)s] succeeded ..."
        return True


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The context and ``extra=`` fields of a record (task lines get all of TASK_FIELDS)."""
    out = {k: v for k, v in vars(record).items()
           if k not in _RECORD_ATTRS and not k.startswith("_")}
    if out.get("task_id") is not None:
        for k in TASK_FIELDS:
            out.setdefault(k, None)
    return out


def _ts(record: logging.LogRecord) -> str:
    t = datetime.fromtimestamp(record.created, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, process, pid, the
    context fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"timestamp": _ts(record), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage(),
                               "process": _process["name"], "pid": record.process}
        out.update(fields_of(record))
        if record.exc_info:
            out["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return _encodable(json.dumps(out, default=str, ensure_ascii=False))


def json_line(message: str, *, logger: str, level: int = logging.INFO) -> str:
    """``message`` as one JSON log line of this process (for output written without a
    logger, such as ``autonomy up``'s own lines)."""
    record = logging.LogRecord(logger, level, "", 0, message, None, None)
    return JsonFormatter().format(record)


class TextFormatter(logging.Formatter):
    """``ts LEVEL process logger: msg  key=value ...`` (a traceback below, indented)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_ts(record)} {record.levelname:<5} {_process['name']} {record.name}: "
                f"{record.getMessage()}")
        extra = fields_of(record)
        shown = {k: v for k, v in extra.items() if not isinstance(v, dict | list)}
        if shown:
            line += "  " + " ".join(f"{k}={_text(v)}" for k, v in shown.items())
        if record.exc_info:
            tb = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            line += "\n" + "\n".join("    " + ln for ln in tb.splitlines())
        return _encodable(line)


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("uncaught").critical("uncaught %s: %s", kind.__name__, value,
                                           exc_info=(kind, value, tb))


def _encodable(text: str) -> str:
    # a lone surrogate (garbled input) would make the stream's write raise: escape it
    # (in a JSON line the escape is JSON's own \udcxx, which parses back)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _text(v: Any) -> str:
    s = "-" if v is None else str(v)
    return json.dumps(s) if (" " in s or not s) else s


def configure(settings: Settings | None = None, *, process: str,
              level: str | int | None = None, stream: IO[str] | None = None) -> None:
    """Route every logger of this process through one handler in the configured format
    (``settings.log_format``), at ``level`` (default ``settings.log_level``)."""
    s = settings or get_settings()
    _process["name"] = process
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if s.log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level is not None else s.log_level.upper())
    logging.captureWarnings(True)  # Python warnings too ("py.warnings"), not bare stderr
    if s.log_format == "json":  # a traceback that ends the process: one JSON line too
        sys.excepthook = _log_uncaught
    # libraries that install their own handlers: let their lines reach ours instead
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "alembic"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # billiard (Celery's pool) logs on "multiprocessing" with propagate off: give it ours
    mp = logging.getLogger("multiprocessing")
    mp.handlers.clear()
    mp.addHandler(handler)
    mp.propagate = False


_stdout: dict[str, Any] = {}


def capture_stdout(logger: str = "stdout") -> None:
    """Make each line this process -- and the processes it forks -- writes on its standard
    output a log line of ``logger`` (blank lines dropped).

    For JSON mode in processes whose libraries print past ``logging`` (Celery's banners and
    its "Warm shutdown" notice go straight to file descriptor 1): the descriptor becomes a
    pipe that a thread reads. At exit the descriptor is restored and the thread drains what
    is left (up to 2 s, while forked children still hold the pipe)."""
    if _stdout:
        return
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no standard output at all: nothing can be printed there
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    log = logging.getLogger(logger)

    def pump() -> None:
        with open(read_end, encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                if line.strip():
                    log.info(line.rstrip())

    reader = threading.Thread(target=pump, name="stdout-to-log", daemon=True)
    reader.start()
    _stdout.update(saved=saved, reader=reader)
    atexit.register(_release_stdout)


def _release_stdout() -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os.dup2(_stdout["saved"], 1)  # our copy of the pipe's write end closes: EOF for the reader
    _stdout["reader"].join(timeout=2)
