"""One settings object, read from the environment once.

Every tunable is named with its unit (``_s``, ``_ms``, ``_h``). Variables use the
``AUTONOMY_`` prefix; the database and Redis URLs also answer to the usual
``DATABASE_URL`` and ``REDIS_URL``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.redis_url import check_redis_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """Every number the SPEC names, with its unit."""

    # the string under each field is its description: docs/settings.md is generated from
    # them (python -m app.settings_doc)
    model_config = SettingsConfigDict(env_prefix="AUTONOMY_", extra="ignore",
                                      use_attribute_docstrings=True)

    # --- where things are -------------------------------------------------------
    database_url: str = Field(
        default="sqlite:///autonomy.db",
        validation_alias=AliasChoices("AUTONOMY_DATABASE_URL", "DATABASE_URL"),
    )
    """SQLite file (`sqlite:///path`), or `postgresql://...` at scale."""
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AUTONOMY_REDIS_URL", "REDIS_URL"),
        description="Celery broker and results, run-locks, lease dedupe, beat's leader "
                    "lease, the fast path; unset: redis://127.0.0.1:6379/0, or under "
                    "`autonomy up` its embedded Redis. A primary that fails over: "
                    "`redis+sentinel://[:password@]sentinel1:26379,sentinel2:26379/"
                    "<master name>/<db>[?sentinel_password=...]` (docs/operations.md).",
    )
    redis_prefix: str = "autonomy:"
    """Prefix of every Redis key autonomy writes (Celery's keys too, under `<prefix>celery:`);
    a colon is added when missing."""
    db_connect_timeout_s: float = 5.0
    """How long opening a database connection may take before it counts as unreachable."""
    db_busy_timeout_s: float = 30.0
    """SQLite: how long a writer waits for the write lock before giving up."""
    redis_socket_timeout_s: float = 5.0
    """Deadline of each Redis call (and of connecting) outside the fast path."""
    # SPEC 4.7: the fast path (claim/heartbeat/complete's Redis side) gives Redis this long,
    # then the database answers alone; while Redis is degraded it is re-probed after
    # first..max ms (doubling), not on every action
    redis_fast_path_timeout_ms: int = Field(default=250, gt=0)
    """The Redis fast path's own deadline: past it (or on a Redis error) claims, heartbeats and
    completes are answered by the database alone, and status says `redis: degraded`."""
    redis_reprobe_first_ms: int = Field(default=500, gt=0)
    """While Redis is degraded, the first wait before it is probed again (doubling on each
    failed probe)."""
    redis_reprobe_max_ms: int = Field(default=5_000, gt=0)
    """The longest wait between probes of a degraded Redis."""
    redis_degraded_after_misses: int = Field(default=2, ge=1)
    """Fast-path deadlines missed in a row before Redis counts as degraded: one late answer
    from a busy Redis is not an outage; a stalled one misses them all (refusals such as OOM
    or READONLY degrade at once)."""
    data_dir: str = ".autonomy"
    """Where `autonomy up` keeps its files: the embedded Redis's data, beat's schedule, the
    start-up log."""

    # --- lanes, leases, breaker ---------------------------------------------------
    lease_ttl_s: float = 300.0
    """Lease length; a worker heartbeats to extend it."""
    clock_skew_warn_s: float = Field(default=5.0, gt=0)
    """A worker whose clock is off from the database's by more than this (seconds, either
    way) logs a warning, and status counts it as skewed. Leases are decided by the
    database's clock whatever a worker's reads (SPEC 4.9); a skewed clock only misleads
    that host's logs and whatever else runs on it."""
    # how long a claim in flight holds its lane slot in Redis; a racing claim waits for it
    # at most this long (then the database decides alone)
    claim_reserve_ms: int = Field(default=2_000, gt=0)
    """How long a claim in flight holds its lane slot in Redis; a racing claim waits for it at
    most this long (then the database decides alone)."""
    claim_wait_poll_ms: int = Field(default=5, gt=0)
    """How often a claim waiting for a reserved lane slot looks again."""
    default_max_in_flight: int = 1
    """Live leases a lane allows at once until `autonomy lane --max-in-flight` sets its own."""
    # push pickup (app/storage/pickup.py): an idle lane's waiters claim on a wake, or one
    # of them per this period (the safety poll); a claim's waitMs is bounded by the max
    pickup_safety_poll_ms: int = Field(default=5_000, gt=0)
    """Push pickup: an idle lane's waiters claim on a wake, or one of them once per this period
    (the safety poll)."""
    pickup_block_s: float = Field(default=30.0, gt=0, le=3_600)
    """Push pickup: how long a process's one blocked wait on its lanes' wake lists lasts before
    it is re-armed, and how long a lane's safety-poll lead is held (taken again, or by another
    process, when it ends). Each costs one Redis command per process (per lane), so an idle
    fleet costs Redis about two commands per process per this period; a dead leader is
    replaced within 2 x it."""
    claim_wait_max_ms: int = Field(default=30_000, gt=0)
    """The longest a claim with `waitMs` (push pickup, long poll) waits on an empty lane."""
    # how long a LaneWorker's claim waits for work in one call (it checks its stop
    # between calls): in-process, and over HTTP (a long poll)
    worker_wait_ms: int = Field(default=2_000, gt=0)
    """How long a LaneWorker's in-process claim waits for work in one call (it checks its stop
    between calls)."""
    worker_http_wait_ms: int = Field(default=10_000, gt=0)
    """The same over HTTP: the long poll of an `HttpClient` worker."""
    worker_prefetch_auto_wait_ms: int = Field(default=50, gt=0, le=60_000)
    """A worker with `--prefetch auto` (`LaneWorker(prefetch="auto")`) claims as many leases
    at once as its tasks run in this long (their recent mean), 1 to 10: the longest a
    prefetched lease should wait behind the ones before it."""
    # claims waiting at once in one API process (each a coroutine awaiting its turn, one
    # feeder thread per lane: app/api/long_poll.py); past it a claim answers at once, and
    # an HTTP worker polls
    api_long_poll_max: int = Field(default=10_000, ge=1)
    """Claims waiting at once per API process (each a coroutine, no thread: one feeder thread
    per lane); past it a claim answers at once (and an HTTP worker polls)."""
    breaker_threshold: int = 3
    """Same-fingerprint validation failures that pause a lane (and file an ops remediation task)."""
    breaker_window_h: float = 24.0
    """The window the breaker counts failures in (since the lane's last resume)."""
    remediation_lane: str = "ops"
    """The lane that gets the remediation task when the breaker pauses a lane."""
    assignee_max_len: int = 64
    """Longest lane (assignee) name, in characters."""
    worker_max_len: int = 128
    """Longest worker name, in characters."""
    title_max_len: int = 500
    """Longest task title, in characters."""
    reason_max_len: int = 2000
    """Longest validation or pause reason, in characters."""
    payload_max_bytes: int = 65536
    """Largest payload or result; a request body over 3x this (+16 KB) is refused 413 unread."""
    # how deep a payload or result may nest (given as an object or as a JSON string)
    json_max_depth: int = Field(default=32, ge=1, le=200)
    """Deepest nesting of a payload or result (given as an object or a JSON string)."""
    guard_log_max: int = 200
    """Refused duplicates (claims and completes) kept in each lane's capped guard log in
    Redis."""

    # --- task lifecycle (SPEC 4.11; a lane's own values, when set, win) ---------------
    default_max_attempts: int = Field(default=10, ge=1)
    """Failures after which a task ends `dead` instead of going back to `todo` (a lane's
    `max_attempts` wins)."""
    backoff_base_s: float = Field(default=1.0, ge=0)
    """A failed task is claimable again after min(cap, base * 2^attempts) s (a lane's own
    base wins)."""
    backoff_cap_s: float = Field(default=300.0, ge=0)
    """The longest backoff of a failed task (a lane's own cap wins)."""
    backoff_jitter: float = Field(default=0.1, ge=0, le=1)
    """Each backoff is spread by +- this fraction, so failed tasks do not fall due at once."""
    create_delay_max_s: float = Field(default=366 * 86400.0, gt=0)
    """The longest a create may delay its task (`delayS`, `notBefore`)."""
    retention_finished_s: float = Field(default=7 * 86400.0, gt=0)
    """Finished tasks (done, cancelled, dead) with their events, and fingerprint rows,
    older than this are pruned by the `retention` job; a dedupe key lives as long as its
    task. At least the breaker's window."""
    retention_batch: int = Field(default=500, ge=1, le=10_000)
    """Rows the `retention` job prunes per batch (each batch its own short transaction)."""
    retention_max_batches: int = Field(default=20, ge=1)
    """Batches the `retention` job runs at most per run."""

    # --- stale rules and checks ---------------------------------------------------
    handoff_stale_after_s: float = 1800.0
    """A NO_GO handoff snapshot older than this is stale."""
    incident_stale_after_s: float = 2700.0
    """A critical or warning incident older than this reads `recovering`."""
    handoff_fail_threshold: int = 2
    """Consecutive failing runs before a handoff criterion is NO_GO."""
    recovery_threshold: int = 1
    """Consecutive passing runs before a NO_GO criterion is GO again."""
    backlog_stall_min_s: float = 2700.0
    """How long a backlog stall lasts before it counts as sustained."""
    ops_issue_threshold: int = 2
    """Consecutive readiness runs that read the ops incident state `warning`/`critical` before
    readiness counts a sustained ops failure (NO_GO)."""
    job_missed_after_factor: float = 3.0
    """A periodic job reads `missed` when its last start is older than this many of its
    periods."""

    # --- run-locks ----------------------------------------------------------------
    lock_grace_ms: int = 30_000
    """Run-lock TTL = the job's budget + this."""
    lock_heartbeat_interval_ms: int = 2_000
    """How often a run-lock's holder beats (so self-heal can tell it is alive)."""
    lock_holder_dead_after_ms: int = 10_000
    """A run-lock whose holder has not beaten for this long is released by self-heal."""

    # --- periodic jobs (beat_schedule.py holds the defaults) ------------------------
    beat_every_s: float | None = Field(default=None, gt=0)
    """Run every periodic job at this period instead of `beat_schedule.py`'s (unset: the
    schedule's)."""
    job_min_runtime_ms: dict[str, int] = Field(default_factory=dict)
    """Per job, the least time a run holds its run-lock (JSON object, e.g. `{"readiness":
    25000}`; the demo uses it to show a lock)."""
    beat_standby_poll_s: float = Field(default=2.0, gt=0)
    """How often a standby beat checks whether the leader lease is free."""
    # the beat leader lease (app/leader.py): a leader that stops renewing loses it within
    # the TTL; renewal runs well inside it
    beat_lease_ttl_ms: int = Field(default=10_000, gt=0)
    """The beat leader lease's TTL: a standby leads within it once the leader stops renewing."""
    beat_lease_renew_ms: int = Field(default=2_000, gt=0)
    """How often the leading beat renews its lease (must be below the TTL)."""

    # --- interfaces ---------------------------------------------------------------
    api_token: SecretStr | None = None
    """The bootstrap operator credential (SPEC 4.10, `docs/security.md`): a bearer token for
    every action; with it or any minted credential configured, every read but `/livez`,
    `/readyz` and `/metrics` needs a credential too. Unset (and none minted) = loopback only."""
    credential_cache_ms: int = Field(default=500, ge=0, le=1000)
    """How long an API process trusts a credential it resolved (and whether any is
    configured) before asking the database again: a revocation holds on every API process
    within it (at most 1 s)."""
    metrics_require_read: bool = False
    """Make `/metrics` need a `read` credential like every other read (it never carries task
    text either way)."""
    api_host: str = "127.0.0.1"
    """Address `autonomy serve` and `up` bind; beyond loopback needs a credential:
    `api_token`, or one minted with `autonomy token create` (the database is asked)."""
    api_port: int = 8000
    """Port of the API and control panel."""
    flower_port: int = 5555
    """Port of Flower."""
    flower_basic_auth: str | None = None
    """`user:pass` for Flower; required to bind Flower beyond loopback."""
    celery_queue: str = "autonomy"
    """The Celery queue the check jobs go to."""
    # a Celery worker that takes no message for this long while messages wait in its queue
    # and its pool has room stops (exit 70) for its supervisor to restart; 0: never
    celery_watchdog_s: float = Field(default=120.0, ge=0)
    """A Celery worker that takes no message this long while messages wait and its pool has
    room exits 70, for its supervisor to restart (0: off)."""
    # /readyz: answer 503 while Redis is down (False: 200 with "redis": "degraded", for
    # deployments that keep serving from the database alone)
    readyz_redis_required: bool = True
    """`/readyz` answers 503 while Redis is down (`false`: 200 with `redis: degraded`, for
    deployments that keep serving from the database alone)."""
    # set by `autonomy up` for each child it starts; /livez echoes it, so `up` knows the
    # answer came from its own child, not from whatever else holds the port
    start_nonce: str | None = None
    """Set by `autonomy up` for each child it starts; `/livez` echoes it, so `up` knows the
    answer came from its own child."""
    # the Host names the API answers to (SPEC 4.8): empty means the bind address
    # (api_host), localhost and the loopback literals; "*" allows any (behind a proxy that
    # checks it). Comma-separated.
    allowed_hosts: str = ""
    """Comma-separated `Host` names the server answers to (else 421); empty: the bind address,
    `localhost` and the loopback literals; `*`: any (behind a proxy that checks it)."""
    # origins besides the server's own that may send requests, comma-separated
    # (e.g. "https://ops.example")
    allowed_origins: str = ""
    """Comma-separated origins besides the server's own that may send requests (else 403), e.g.
    `https://ops.example`."""

    # --- logs (app/logs.py): one format for the API, Celery worker and beat, `autonomy worker`
    # "text": a readable line (for a terminal); "json": one JSON object per line
    log_format: Literal["text", "json"] = "text"
    """`text`: a readable line; `json`: every process writes one JSON object a line
    (`timestamp`, `level`, `logger`, `message`, `process`, ids)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """`DEBUG`, `INFO`, `WARNING` or `ERROR`."""

    # --- control panel and `autonomy up` (issue 4: app/api/panel.py, app/local/up.py) ----------
    panel_refresh_ms: int = 3_000
    """How often the control panel refreshes."""
    # the local default Redis address: with no REDIS_URL, `autonomy up` still starts its
    # embedded Redis, and names a Redis found listening here (leaving it alone); a setting
    # so tests can point it at a Redis of their own
    local_redis_probe_url: str = DEFAULT_REDIS_URL
    """With no `REDIS_URL`, the address where `autonomy up` looks for a Redis to name (and
    leave alone) before it starts its embedded one."""
    up_ready_timeout_s: float = 60.0
    """How long `autonomy up` waits for its children to answer before it gives up."""
    up_stop_grace_s: float = 15.0
    """How long `autonomy up` waits for a child to stop after SIGTERM before it kills it."""
    # --- end of issue 4 block ------------------------------------------------------------
    # `autonomy up` restarts a child that exits: after first..max s (doubling while it keeps
    # dying within min_uptime of its start); that many quick deaths in a row stop the stack
    up_restart_backoff_first_s: float = Field(default=1.0, gt=0)
    """`autonomy up` restarts a child that exits after this long, doubling while it keeps dying."""
    up_restart_backoff_max_s: float = Field(default=30.0, gt=0)
    """The longest wait before a restart."""
    up_child_min_uptime_s: float = Field(default=10.0, ge=0)
    """A child that exits sooner than this after its start counts as a quick death."""
    up_child_max_quick_deaths: int = Field(default=5, ge=1)
    """Quick deaths in a row that stop the whole stack."""

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _log_case(cls, v: object, info: object) -> object:
        if not isinstance(v, str):
            return v
        return v.strip().lower() if getattr(info, "field_name", "") == "log_format" \
            else v.strip().upper()

    @field_validator("redis_url")
    @classmethod
    def _redis_url_usable(cls, v: str | None) -> str | None:
        return None if v is None else check_redis_url(v)

    @field_validator("redis_prefix")
    @classmethod
    def _prefix_ends_with_colon(cls, v: str) -> str:
        return v if v.endswith(":") else v + ":"

    @field_validator("breaker_threshold", "handoff_fail_threshold", "recovery_threshold",
                     "ops_issue_threshold", "default_max_in_flight")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @model_validator(mode="after")
    def _lease_renewed_inside_its_ttl(self) -> Settings:
        if self.beat_lease_renew_ms >= self.beat_lease_ttl_ms:
            raise ValueError("beat_lease_renew_ms must be below beat_lease_ttl_ms")
        return self

    @model_validator(mode="after")
    def _retention_keeps_the_breaker_window(self) -> Settings:
        # the breaker counts fingerprint rows of its window: retention must not prune them
        if self.retention_finished_s < self.breaker_window_h * 3600:
            raise ValueError("retention_finished_s must cover breaker_window_h")
        return self

    @property
    def allowed_host_names(self) -> list[str]:
        """``allowed_hosts`` as a list of lower-case names."""
        return [x.strip().lower() for x in self.allowed_hosts.split(",") if x.strip()]

    @property
    def allowed_origin_list(self) -> list[str]:
        """``allowed_origins`` as a list (without trailing slashes)."""
        return [x.strip().rstrip("/").lower() for x in self.allowed_origins.split(",")
                if x.strip()]

    @property
    def request_max_bytes(self) -> int:
        """The largest request body read: a payload and a result, each up to
        ``payload_max_bytes`` (escaped, up to 2x), and the envelope."""
        return self.payload_max_bytes * 3 + 16_384

    @property
    def effective_redis_url(self) -> str:
        """The Redis URL in force: the configured one or the local default."""
        return self.redis_url or DEFAULT_REDIS_URL

    @property
    def lease_ttl_ms(self) -> int:
        return int(self.lease_ttl_s * 1000)


def describe_invalid(e: ValidationError) -> str:
    """What is wrong with the settings, one ``NAME: why`` per problem, without the values
    given (a URL may carry a password)."""
    problems = []
    for err in e.errors(include_url=False, include_input=False):
        name = ".".join(str(x) for x in err.get("loc", ())) or "settings"
        problems.append(f"{name}: {err.get('msg', 'invalid')}".replace("Value error, ", ""))
    return "; ".join(problems) or "invalid settings"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read and validated once."""
    return Settings()
