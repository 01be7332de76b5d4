"""Credentials (SPEC 4.10): minted, listed, revoked and rotated (the CLI), and resolved
from a presented secret on every API request.

A secret is ``aut_`` and 43 url-safe characters (256 random bits), shown once; the store
keeps only its HMAC-SHA256 under the deployment's key (migration 0007), looked up by that
hash (an index read: its time does not depend on how much of a guess is right) and
compared again with ``hmac.compare_digest``. ``AUTONOMY_API_TOKEN`` stays the bootstrap
operator credential: it is compared as an HMAC under a per-process random key, so its
comparison takes the same time whatever a guess's length or prefix.

A resolved credential is cached in the process for ``credential_cache_ms`` (at most
1 s), and so is "is any credential live": a revocation holds on every API process within
that time, without a database read on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from app import validate
from app.clock import iso
from app.errors import Conflict, ForbiddenScope, InvalidInput, NotFound
from app.principal import SCOPES, Principal, Scope
from app.settings import Settings
from app.storage import credentials as cstore
from app.storage import store
from app.storage.context import Context
from app.storage.db import make_engine, missing_sqlite_file, transaction

BOOTSTRAP_NAME = "bootstrap"
SECRET_PREFIX = "aut_"
_PROCESS_KEY = secrets.token_bytes(32)  # the bootstrap token's comparison key


def _digest(key: bytes, secret: str) -> str:
    return hmac.new(key, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


class _Cache:
    """Per-process answers, each kept ``ttl_s``: the hashing key (forever), whether any
    credential is live, and the credentials resolved by hash."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: bytes | None = None
        self.any: tuple[float, bool] | None = None
        self.by_hash: dict[str, tuple[float, Principal | None]] = {}


# one cache per database engine (weakly: a closed context's goes with its engine)
_caches: weakref.WeakKeyDictionary[Any, _Cache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _cache(ctx: Context) -> _Cache:
    with _caches_lock:
        c = _caches.get(ctx.engine)
        if c is None:
            c = _caches[ctx.engine] = _Cache()
        return c


def _ttl_s(ctx: Context) -> float:
    return min(ctx.settings.credential_cache_ms, 1000) / 1000


def _key(ctx: Context) -> bytes:
    c = _cache(ctx)
    if c.key is None:
        with transaction(ctx.engine) as conn:
            c.key = cstore.hashing_key(conn).encode()
    return c.key


def bootstrap_token(ctx: Context) -> str | None:
    """``AUTONOMY_API_TOKEN``, or None when none (or a blank one) is configured."""
    t = ctx.settings.api_token
    token = t.get_secret_value().strip() if t is not None else ""
    return token or None


def bootstrap_principal(token: str) -> Principal:
    """The operator ``AUTONOMY_API_TOKEN`` stands for."""
    return Principal(name=BOOTSTRAP_NAME, scope="operator",
                     lease_key=hmac.new(token.encode(), b"lease", hashlib.sha256).digest())


_expected_digests: dict[int, tuple[str, str]] = {}


def _expected(ctx: Context, token: str) -> str:
    """The bootstrap token's digest, computed once per settings object (kept by the
    object's id, checked by the token's identity): a check never reads the token itself,
    so neither its length nor its content shows in the time taken."""
    key = id(ctx.settings)
    entry = _expected_digests.get(key)
    if entry is not None and entry[0] is token:
        return entry[1]
    digest = _digest(_PROCESS_KEY, token)
    if len(_expected_digests) > 4096:  # settings objects made and dropped (tests)
        _expected_digests.clear()
    _expected_digests[key] = (token, digest)
    return digest


def is_bootstrap(ctx: Context, secret: str) -> Principal | None:
    """The bootstrap operator, when ``secret`` is ``AUTONOMY_API_TOKEN``: both are
    HMAC'd under a per-process key and the digests compared in constant time, so neither
    the token's length nor a guess's right prefix shows in the time taken."""
    boot = bootstrap_token(ctx)
    given = _digest(_PROCESS_KEY, secret)
    if hmac.compare_digest(given, _expected(ctx, boot or "")) and boot is not None:
        return bootstrap_principal(boot)
    return None


def auth_enabled(ctx: Context) -> bool:
    """Is any credential configured (the bootstrap token, or one ever minted -- revoking
    the last one does not open the server)? Then every read that shows tasks needs
    ``read`` and every action a credential."""
    if bootstrap_token(ctx) is not None:
        return True
    c = _cache(ctx)
    now = time.monotonic()
    cached = c.any
    if cached is not None and now - cached[0] < _ttl_s(ctx):
        return cached[1]
    with transaction(ctx.engine, write=False) as conn:
        live = cstore.any_minted(conn)
    c.any = (now, live)
    return live


def stored(settings: Settings) -> tuple[int, int]:
    """``(minted, live)``: the credentials ``settings``' database holds (revoked ones
    count towards ``minted``: they keep the server closed, as ``auth_enabled`` says), read
    with an engine of its own -- for a decision made before the server has a context
    (``autonomy serve``/``up`` on an open address). ``Unavailable`` (down, not
    migrated) when the database cannot tell."""
    if missing_sqlite_file(settings.database_url) is not None:
        return 0, 0  # holds none; asked, not made (connecting would create the file)
    engine = make_engine(settings.database_url,
                         connect_timeout_s=settings.db_connect_timeout_s,
                         busy_timeout_s=settings.db_busy_timeout_s, pool_size=1)
    try:
        with transaction(engine, write=False) as conn:
            return cstore.counts(conn)
    finally:
        engine.dispose()


def resolve(ctx: Context, secret: str) -> Principal | None:
    """The credential ``secret`` is, or None. Takes the same time for any wrong secret
    (see the module docstring)."""
    boot = is_bootstrap(ctx, secret)
    if boot is not None:
        return boot
    h = _digest(_key(ctx), secret)
    c = _cache(ctx)
    now = time.monotonic()
    cached = c.by_hash.get(h)
    if cached is not None and now - cached[0] < _ttl_s(ctx):
        return cached[1]
    with transaction(ctx.engine, write=False) as conn:
        row = cstore.by_hash(conn, secret_hash=h)
    found = None
    if row is not None and hmac.compare_digest(row["secret_hash"], h):
        found = _principal(row)
    if found is not None:  # only hits are kept: a flood of guesses cannot fill memory
        with c.lock:
            if len(c.by_hash) > 10_000:
                c.by_hash.clear()
            c.by_hash[h] = (now, found)
    return found


def _principal(row: Any) -> Principal:
    return Principal(name=row["name"], scope=row["scope"], lanes=tuple(row["lanes"] or ()),
                     worker=row["worker"], worker_prefix=row["worker_prefix"],
                     lease_key=hmac.new(row["secret_hash"].encode(), b"lease",
                                        hashlib.sha256).digest())


# --- minting ----------------------------------------------------------------------------


def _check_name(value: Any, ctx: Context, field: str) -> str:
    return validate.worker(value, ctx.settings, field=field)


def create(ctx: Context, *, name: str, scope: str, lanes: Sequence[str] = (),
           worker: str | None = None, worker_prefix: str | None = None,
           created_by: str | None = None) -> dict[str, Any]:
    """Mint a credential; the answer holds its ``secret``, shown this once.

    A ``worker`` credential needs at least one lane, and is bound to the worker name
    ``worker`` (default: its own name) or to the names starting ``worker_prefix``."""
    n = _check_name(name, ctx, "name")
    if scope not in SCOPES:
        raise InvalidInput(f"scope must be one of {', '.join(SCOPES)}", field="scope")
    sc: Scope = scope
    ls = [validate.assignee(x, ctx.settings) for x in lanes]
    if sc == "worker":
        if not ls:
            raise InvalidInput("a worker credential needs at least one --lane", field="lanes")
        if worker_prefix is not None:
            worker_prefix = _check_name(worker_prefix, ctx, "workerPrefix")
        else:
            worker = _check_name(worker if worker is not None else n, ctx, "worker")
    elif ls or worker or worker_prefix:
        raise InvalidInput(f"lanes and worker names bind worker credentials only, not "
                           f"{sc}", field="scope")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    now = ctx.clock()
    with transaction(ctx.engine) as conn:
        if cstore.active_by_name(conn, name=n) is not None:
            raise Conflict(f"a live credential is named {n!r}; revoke it, or rotate it",
                           name=n)
        row = cstore.insert(conn, name=n, scope=sc, lanes=ls, worker=worker,
                            worker_prefix=worker_prefix,
                            secret_hash=_digest(cstore.hashing_key(conn).encode(), secret),
                            now=now, created_by=created_by)
        store.insert_event(conn, kind="credential_created", at=now, actor=created_by,
                           reason=None, data={"name": n, "scope": sc, "lanes": ls})
    _cache(ctx).any = None
    return {"ok": True, "credential": _wire(row), "secret": secret}


def list_credentials(ctx: Context, *, include_revoked: bool = False) -> dict[str, Any]:
    """Every credential (never a secret: none is stored)."""
    with transaction(ctx.engine, write=False) as conn:
        rows = cstore.list_all(conn, include_revoked=include_revoked)
    return {"ok": True, "credentials": [_wire(r) for r in rows]}


def revoke(ctx: Context, *, name: str, by: str | None = None) -> dict[str, Any]:
    """Revoke the live credential ``name``: refused everywhere within a second."""
    n = _check_name(name, ctx, "name")
    now = ctx.clock()
    with transaction(ctx.engine) as conn:
        if not cstore.revoke(conn, name=n, now=now, by=by):
            raise NotFound(f"no live credential named {n!r}", name=n)
        store.insert_event(conn, kind="credential_revoked", at=now, actor=by,
                           data={"name": n})
    _cache(ctx).any = None
    return {"ok": True, "revoked": n, "revokedAt": iso(now)}


def rotate(ctx: Context, *, name: str, by: str | None = None) -> dict[str, Any]:
    """Revoke ``name`` and mint it again with the same scope and bindings (a new
    secret, shown once); leases its old secret holds are refused from now on."""
    n = _check_name(name, ctx, "name")
    with transaction(ctx.engine, write=False) as conn:
        old = cstore.active_by_name(conn, name=n)
    if old is None:
        raise NotFound(f"no live credential named {n!r}", name=n)
    revoke(ctx, name=n, by=by)
    return create(ctx, name=n, scope=old["scope"], lanes=old["lanes"] or (),
                  worker=old["worker"], worker_prefix=old["worker_prefix"], created_by=by)


def _wire(row: Any) -> dict[str, Any]:
    r = cstore.row_dict(row)
    return {"id": r["id"], "name": r["name"], "scope": r["scope"], "lanes": r["lanes"] or [],
            "worker": r["worker"], "workerPrefix": r["worker_prefix"],
            "createdAt": iso(r["created_at"]), "createdBy": r["created_by"],
            "revokedAt": iso(r["revoked_at"]), "revokedBy": r["revoked_by"]}


# --- refusals ---------------------------------------------------------------------------


def refuse(ctx: Context, p: Principal, *, action: str, message: str,
           assignee: str | None = None, task_id: int | None = None,
           data: dict[str, Any] | None = None) -> ForbiddenScope:
    """Record a scope refusal as an event (actor: the credential) and answer the error
    to raise. The event is best effort: a database that cannot take it still refuses."""
    try:
        with transaction(ctx.engine) as conn:
            store.insert_event(conn, kind="forbidden_scope", at=ctx.clock(),
                               assignee=assignee[:64] if assignee else None,
                               task_id=task_id, actor=p.name, reason="forbidden_scope",
                               data={"action": action, "scope": p.scope, **(data or {})})
    except Exception:  # the refusal stands whether or not its event could be written
        pass
    return ForbiddenScope(message, action=action, scope=p.scope)
