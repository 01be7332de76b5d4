"""The periodic check jobs as Celery tasks (scheduled by ``beat_schedule.JOBS``).

Each task runs one job under its run-lock through ``app.ops.checks.jobs.run_job`` and returns
its JSON answer -- the stored result Flower shows. A refusal of the domain (an
``AutonomyError``) is an answer, ``{"ok": false, "error": code, "message": ...}``, not a
traceback; an unreachable Redis or database raises, so Celery records a failure and the
operator sees a red task.

Flower shows a task's result as Celery's ``saferepr`` of it, which elides every container
nested deeper than three levels (``{...}``) and cuts the text at the task's
``resultrepr_maxsize``. So the ``status`` task answers the status payload in a shape that
renders in full (``flower_shape``): each part nested deeper is lifted to the top under its
dotted path (``workflowHealth.runLocks``, ``handoff.criteria``, ...), the run-locks and the
beat leader lease first, and its ``resultrepr_maxsize`` is raised to 64 KiB.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

import beat_schedule
from app.celery_app import app, worker_context
from app.errors import AutonomyError, Unavailable

_log = logging.getLogger("tasks.checks")


def _run(task: Task, job: str) -> dict[str, Any]:
    from app.ops.checks import send_window
    from app.ops.checks.jobs import run_job
    from app.ops.run_locks import holder_name as default_holder

    # a message that outlived its period on Redis's clock is skipped (send_window)
    late = send_window.overdue(worker_context(), getattr(task.request, send_window.SENT, None),
                               getattr(task.request, send_window.PERIOD, None))
    if late is not None:
        _log.warning("skipping %s: its message expired at %s (sent %s, Redis's now %s)",
                     job, late["expiredAt"], late["sentAt"], late["redisNow"])
        return {"ok": True, "job": job, "skipped": "expired", **late}
    try:
        return run_job(worker_context(), job, holder=default_holder(task.request.id))
    except Unavailable:
        raise
    except AutonomyError as e:
        return {**e.to_wire(), "job": job}


STATUS_REPR_MAX = 64 * 1024
_LEVELS = 3  # saferepr's maxlevels: containers at deeper levels print as {...}
_FIRST = ("workflowHealth.runLocks", "beat")


def _depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((_depth(x) for x in v.values()), default=0)
    if isinstance(v, list | tuple):
        return 1 + max((_depth(x) for x in v), default=0)
    return 0


def flower_shape(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with every part nested deeper than Flower prints lifted to the top
    under its dotted path; no value is dropped or changed."""
    out: dict[str, Any] = {}

    def lift(path: str, v: Any) -> None:
        if _depth(v) <= _LEVELS - 1:
            out[path] = v
        elif isinstance(v, dict):
            shallow = {k: x for k, x in v.items() if _depth(x) <= _LEVELS - 2}
            if shallow or not v:
                out[path] = shallow
            for k, x in v.items():
                if k not in shallow:
                    lift(f"{path}.{k}", x)
        else:
            for i, x in enumerate(v):
                lift(f"{path}[{i}]", x)

    for k, v in payload.items():
        if _depth(v) <= _LEVELS - 1:
            out[k] = v
        else:
            lift(k, v)
    first = {k: out.pop(k) for k in _FIRST if k in out}
    return {**first, **out}


def payload_of(shaped: dict[str, Any]) -> dict[str, Any]:
    """The status payload back from its ``flower_shape`` (for readers of the stored
    result): each lifted part returns under its dotted path."""
    out: dict[str, Any] = {}
    # shallow paths first, so a part lifted from a dict lands in that dict
    for path in sorted(shaped, key=lambda p: len(_steps(p))):
        steps = _steps(path)
        node: Any = out
        for i, step in enumerate(steps[:-1]):
            nxt: Any = [] if isinstance(steps[i + 1], int) else {}
            if isinstance(node, list):
                while len(node) <= step:  # type: ignore[operator]
                    node.append(None)
                if node[step] is None:
                    node[step] = nxt
                node = node[step]
            else:
                node = node.setdefault(step, nxt)
        last, value = steps[-1], shaped[path]
        if isinstance(node, list):
            while len(node) <= last:  # type: ignore[operator]
                node.append(None)
            node[last] = value
        elif isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = {**value, **node[last]}
        else:
            node[last] = value
    return out


def _steps(path: str) -> list[Any]:
    """``"a.b[2].c"`` -> ``["a", "b", 2, "c"]``."""
    out: list[Any] = []
    for part in path.split("."):
        name, *indexes = part.split("[")
        if name:
            out.append(name)
        out.extend(int(i.rstrip("]")) for i in indexes)
    return out


def _register(job: str, name: str) -> Task:
    def run(self: Task) -> dict[str, Any]:
        answer = _run(self, job)
        return flower_shape(answer) if job == "status" else answer

    run.__name__ = run.__qualname__ = job
    run.__doc__ = f"Run the ``{job}`` check under its run-lock."
    options: dict[str, Any] = {"resultrepr_maxsize": STATUS_REPR_MAX} if job == "status" else {}
    return app.task(bind=True, name=name, **options)(run)


# one task per job, named as beat_schedule.JOBS names it: tasks.checks.handoff_health, ...
TASKS: dict[str, Task] = {job: _register(job, str(spec["task"]))
                          for job, spec in beat_schedule.JOBS.items()}
