"""Who is asking (SPEC 4.10): the credential a request was authenticated with, for the
operations that must know it -- which lease tokens are its own, and whose name the audit
trail records.

The API sets it for the duration of one action (``acting``); the CLI and in-process
workers set none (they act on the database directly, as operator). With none set,
everything behaves as before credentials existed.

Lease tokens stay 32 hex characters (the wire format): with a principal, the first 16 are
random and the last 16 an HMAC of them under the principal's lease key, so whether a
token was granted to this credential is answered without a database read, in constant
time, and no other credential can use it even if it learns it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

Scope = Literal["operator", "worker", "read"]
SCOPES: tuple[Scope, ...] = ("operator", "worker", "read")


@dataclass(frozen=True)
class Principal:
    """A credential as the API resolved it."""

    name: str
    scope: Scope
    lanes: tuple[str, ...] = ()
    worker: str | None = None
    worker_prefix: str | None = None
    lease_key: bytes = field(default=b"", repr=False)

    def may_use_lane(self, lane: str) -> bool:
        """A worker credential's lanes; every lane for the others."""
        return self.scope != "worker" or lane in self.lanes

    def may_act_as(self, worker: str) -> bool:
        """A worker credential's worker name (exact, or by prefix); any for the others."""
        if self.scope != "worker":
            return True
        if self.worker is not None and worker == self.worker:
            return True
        return self.worker_prefix is not None and worker.startswith(self.worker_prefix)

    def may_read(self) -> bool:
        """Status, panel, history, fingerprints, tasks."""
        return self.scope in ("operator", "read")


_current: ContextVar[Principal | None] = ContextVar("autonomy_principal", default=None)


def current() -> Principal | None:
    """The principal of the action running in this context, if any."""
    return _current.get()


@contextmanager
def acting(p: Principal | None) -> Iterator[None]:
    """Run the block as ``p``."""
    reset = _current.set(p)
    try:
        yield
    finally:
        _current.reset(reset)


def local_operator() -> Principal:
    """The CLI acting on the database directly: an operator named after the OS user,
    for the audit trail; its leases are bound to no credential."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no login name (a bare container)
        user = "unknown"
    return Principal(name=f"cli:{user}"[:128], scope="operator")


def _tag(key: bytes, nonce: str) -> str:
    return hmac.new(key, nonce.encode(), hashlib.sha256).hexdigest()[:16]


def new_lease_token() -> str:
    """A fresh lease token: bound to the current principal when there is one."""
    p = current()
    if p is None or not p.lease_key:
        return secrets.token_hex(16)
    nonce = secrets.token_hex(8)
    return nonce + _tag(p.lease_key, nonce)


def owns_lease(token: str | None) -> bool:
    """Was ``token`` granted to the current principal? (Always, with none set.)"""
    p = current()
    if p is None or not p.lease_key:  # the CLI on the database: operator, unbound
        return True
    if not isinstance(token, str) or len(token) != 32:
        return False
    return hmac.compare_digest(token[16:], _tag(p.lease_key, token[:16]))


def audit(actor: str | None, data: dict[str, Any] | None = None
          ) -> tuple[str | None, dict[str, Any]]:
    """An event's ``(actor, data)``: under a principal, the actor is the credential's name
    and the actor the caller gave is kept only as ``actorNote`` in the data."""
    out = dict(data or {})
    p = current()
    if p is None:
        return actor, out
    if actor is not None and actor != p.name and "actorNote" not in out:
        out["actorNote"] = actor
    return p.name, out
