"""The str-Enums of the domain: task statuses and kinds, outcomes, incident statuses.

Base layer: the tables (``app.storage.models``), the input rules (``app.validate``) and the
faces all name these, so they live below all of them.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    todo = "todo"
    in_progress = "in_progress"
    done = "done"
    cancelled = "cancelled"
    dead = "dead"


class TaskKind(StrEnum):
    work = "work"
    ops_remediation = "ops_remediation"


class Outcome(StrEnum):
    success = "success"
    failure = "failure"


class IncidentStatus(StrEnum):
    ok = "ok"
    warning = "warning"
    critical = "critical"
    recovering = "recovering"
