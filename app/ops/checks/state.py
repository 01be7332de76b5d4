"""Persisted check state, read through the SPEC's stale rules (4.4).

Each state is one ``check_state`` row: a JSON object and the time it was written, upserted
in the caller's transaction, so an interrupted write never leaves a torn state. A state
that is missing, not a JSON object, of the wrong shape, or written in the future is
reported as such (``error``) -- never a crash, never read as healthy.

Names: ``handoff`` (the handoff snapshot), ``ops_incident``, ``readiness``, ``self_heal``
and ``job:{name}`` (each periodic job's last run).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection

from app import principal, validate
from app.clock import iso
from app.errors import RedisUnavailable
from app.storage import locks, store
from app.storage.context import Context
from app.storage.db import transaction
from app.storage.models import IncidentStatus

# a state written a little ahead of this host's clock is another host's skew, not a lie
FUTURE_SKEW = timedelta(seconds=60)

HANDOFF, OPS_INCIDENT, READINESS, SELF_HEAL = "handoff", "ops_incident", "readiness", "self_heal"


def job_state_name(job: str) -> str:
    return f"job:{job}"


@dataclass(frozen=True)
class Read:
    """One state as read: ``data`` is None whenever ``error`` says why."""

    data: dict[str, Any] | None
    written_at: datetime | None
    error: str | None

    def age_s(self, now: datetime) -> float | None:
        return None if self.written_at is None else (now - self.written_at).total_seconds()


Shape = Callable[[Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class States:
    """Check-state rows read together (one query), checked one by one on ``get``."""

    rows: Mapping[str, Any]
    now: datetime

    def get(self, name: str, shape: Shape | None = None) -> Read:
        return check_row(self.rows.get(name), now=self.now, shape=shape)


def load(conn: Connection, *, names: Sequence[str], now: datetime) -> States:
    """Read the named states in one query; each is checked when asked for."""
    return States(rows=store.read_check_states(conn, names=names), now=now)


def read(conn: Connection, *, name: str, now: datetime, shape: Shape | None = None) -> Read:
    """Read one state and check it: ``missing``, ``invalid_json``, ``invalid_shape: ...``
    or ``future_timestamp`` in ``error`` when it cannot be trusted."""
    row = store.read_check_state(conn, name=name)
    return check_row(row, now=now, shape=shape)


def check_row(row: Any, *, now: datetime, shape: Shape | None) -> Read:
    if row is None:
        return Read(None, None, "missing")
    written = row["written_at"]
    try:
        data = json.loads(row["data"])
    except (TypeError, ValueError):
        return Read(None, written, "invalid_json")
    if not isinstance(data, dict):
        return Read(None, written, "invalid_shape: not a JSON object")
    if written is None or written > now + FUTURE_SKEW:
        return Read(None, written, "future_timestamp")
    problem = shape(data) if shape else None
    if problem:
        return Read(None, written, f"invalid_shape: {problem}")
    return Read(data, written, None)


@dataclass
class Fence:
    """A check run's run-lock, as the guard of its writes (SPEC 4.7): ``check(what)``
    right before a state write or a side effect, inside its transaction, raises
    ``RunLockLost`` unless the run's token still holds the lock (or Redis cannot say)."""

    ctx: Context
    held: locks.Held

    def check(self, what: str) -> None:
        ok = not self.held.lost
        if ok:
            try:
                ok = locks.holds(self.ctx, self.held.job, self.held.token)
            except RedisUnavailable:
                ok = False  # cannot tell: never write on a lock that may be another's
        if not ok:
            self.held.lost = True
            raise locks.RunLockLost(self.held.job, what)


def write(conn: Connection, *, name: str, data: Mapping[str, Any], now: datetime) -> None:
    """Persist one state with the time it was written (atomic with the transaction)."""
    store.write_check_state(conn, name=name, data=json.dumps(data, separators=(",", ":")),
                            now=now)


# --- shapes ------------------------------------------------------------------------------


def fields(**types: type | tuple[type, ...]) -> Shape:
    """A shape check: each named field present with one of the given types (bool is not
    an int here)."""
    def check(d: Mapping[str, Any]) -> str | None:
        for key, t in types.items():
            v = d.get(key)
            allowed = t if isinstance(t, tuple) else (t,)
            if isinstance(v, bool) and bool not in allowed:
                return f"{key} must be {_names(allowed)}"
            if not isinstance(v, allowed):
                return f"{key} must be {_names(allowed)}"
        return None
    return check


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


# --- ops incident --------------------------------------------------------------------------

_INCIDENT_SHAPE = fields(status=str, reason=(str, type(None)))


def incident_view(r: Read, *, now: datetime, stale_after_s: float) -> dict[str, Any]:
    """The ops incident state through the stale rule: ``critical``/``warning`` older than
    ``stale_after_s`` reads as ``recovering`` with ``stale: true``."""
    out: dict[str, Any] = {"status": None, "reason": None, "writtenAt": iso(r.written_at),
                           "stale": False, "error": r.error}
    if r.data is None:
        return out
    status = r.data["status"]
    if status not in {s.value for s in IncidentStatus}:
        return {**out, "error": f"invalid_shape: unknown status {status!r}"}
    age = r.age_s(now) or 0.0
    out.update(status=status, reason=r.data.get("reason"), actor=r.data.get("actor"))
    if status in (IncidentStatus.critical, IncidentStatus.warning) and age > stale_after_s:
        out.update(status=IncidentStatus.recovering.value, stale=True, writtenStatus=status)
    return out


def incident(states: States, *, ctx: Context) -> dict[str, Any]:
    """The ops incident state as the checks and the status payload see it."""
    r = states.get(OPS_INCIDENT, _INCIDENT_SHAPE)
    view = incident_view(r, now=states.now, stale_after_s=ctx.settings.incident_stale_after_s)
    if r.error == "missing":
        # never set: nothing is wrong, and nobody said so either
        view.update(status=IncidentStatus.ok.value, error=None, neverSet=True)
    return view


def set_ops_incident(ctx: Context, *, status: Any, reason: Any = None, actor: Any = None
                     ) -> dict[str, Any]:
    """Write the ops incident state (``ok``, ``warning``, ``critical``) with the time it was
    written. Raises ``InvalidInput`` for another status or a bad reason."""
    st = validate.incident_status(status).value
    s = ctx.settings
    why = validate.reason(reason, s, required=False, field="reason")
    given = validate.worker(actor, s, field="actor") if actor is not None else None
    # under a credential the state names the credential (the caller's actor: a note)
    who, note = principal.audit(given or ("operator" if principal.current() is None
                                          else None))
    data = {"status": st, "reason": why, "actor": who, **note}
    with transaction(ctx.engine) as conn:
        now = ctx.now_in(conn)  # the stale rule compares it (SPEC 4.4, 4.9)
        write(conn, name=OPS_INCIDENT, data=data, now=now)
        store.insert_event(conn, kind="ops_incident_set", at=now, actor=given, reason=why,
                           data={"status": st})
    return {"ok": True, "opsIncident": {**data, "writtenAt": iso(now), "stale": False,
                                        "error": None}}
