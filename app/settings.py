"""One settings object, read from the environment once.

Every tunable is named with its unit (``_s``, ``_ms``, ``_h``). Variables use the
``AUTONOMY_`` prefix; the database and Redis URLs also answer to the usual
``DATABASE_URL`` and ``REDIS_URL``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """Every number the SPEC names, with its unit."""

    model_config = SettingsConfigDict(env_prefix="AUTONOMY_", extra="ignore")

    # --- where things are -------------------------------------------------------
    database_url: str = Field(
        default="sqlite:///autonomy.db",
        validation_alias=AliasChoices("AUTONOMY_DATABASE_URL", "DATABASE_URL"),
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AUTONOMY_REDIS_URL", "REDIS_URL"),
        description="None means the default local address (and `autonomy up` may embed one).",
    )
    redis_prefix: str = "autonomy:"
    db_connect_timeout_s: float = 5.0
    db_busy_timeout_s: float = 30.0
    redis_socket_timeout_s: float = 5.0
    # SPEC 4.7: the fast path (claim/heartbeat/complete's Redis side) gives Redis this long,
    # then the database answers alone; while Redis is degraded it is re-probed after
    # first..max ms (doubling), not on every action
    redis_fast_path_timeout_ms: int = Field(default=250, gt=0)
    redis_reprobe_first_ms: int = Field(default=500, gt=0)
    redis_reprobe_max_ms: int = Field(default=5_000, gt=0)
    data_dir: str = ".autonomy"

    # --- lanes, leases, breaker ---------------------------------------------------
    lease_ttl_s: float = 300.0
    # how long a claim in flight holds its lane slot in Redis; a racing claim waits for it
    # at most this long (then the database decides alone)
    claim_reserve_ms: int = Field(default=2_000, gt=0)
    claim_wait_poll_ms: int = Field(default=5, gt=0)
    default_max_in_flight: int = 1
    # push pickup (app/storage/pickup.py): an idle lane's waiters claim on a wake, or one
    # of them per this period (the safety poll); a claim's waitMs is bounded by the max
    pickup_safety_poll_ms: int = Field(default=5_000, gt=0)
    claim_wait_max_ms: int = Field(default=30_000, gt=0)
    # how long a LaneWorker's claim waits for work in one call (it checks its stop
    # between calls): in-process, and over HTTP (a long poll)
    worker_wait_ms: int = Field(default=2_000, gt=0)
    worker_http_wait_ms: int = Field(default=10_000, gt=0)
    # claims waiting at once in one API process (each holds a thread of their own pool and
    # a Redis connection, never one the other requests are answered on); past it a claim
    # answers at once, and an HTTP worker polls
    api_long_poll_max: int = Field(default=512, ge=1)
    breaker_threshold: int = 3
    breaker_window_h: float = 24.0
    remediation_lane: str = "ops"
    assignee_max_len: int = 64
    worker_max_len: int = 128
    title_max_len: int = 500
    reason_max_len: int = 2000
    payload_max_bytes: int = 65536
    # how deep a payload or result may nest (given as an object or as a JSON string)
    json_max_depth: int = Field(default=32, ge=1, le=200)
    guard_log_max: int = 200

    # --- task lifecycle (SPEC 4.11; a lane's own values, when set, win) ---------------
    # a task that fails this many times ends ``dead`` instead of going back to ``todo``
    default_max_attempts: int = Field(default=10, ge=1)
    # a failed task is claimable again after min(cap, base * 2^attempts) s, +- jitter
    backoff_base_s: float = Field(default=1.0, ge=0)
    backoff_cap_s: float = Field(default=300.0, ge=0)
    backoff_jitter: float = Field(default=0.1, ge=0, le=1)
    # the longest a create may delay its task (``delayS``, ``notBefore``)
    create_delay_max_s: float = Field(default=366 * 86400.0, gt=0)
    # retention (the ``retention`` job): finished tasks (done, cancelled, dead) with their
    # events, and fingerprint rows, older than this are pruned, in batches of
    # ``retention_batch`` rows (each its own short transaction), at most
    # ``retention_max_batches`` batches per run; a dedupe key lives as long as its task
    retention_finished_s: float = Field(default=7 * 86400.0, gt=0)
    retention_batch: int = Field(default=500, ge=1, le=10_000)
    retention_max_batches: int = Field(default=20, ge=1)

    # --- stale rules and checks ---------------------------------------------------
    handoff_stale_after_s: float = 1800.0
    incident_stale_after_s: float = 2700.0
    handoff_fail_threshold: int = 2
    recovery_threshold: int = 1
    backlog_stall_min_s: float = 2700.0
    ops_issue_threshold: int = 2
    job_missed_after_factor: float = 3.0

    # --- run-locks ----------------------------------------------------------------
    lock_grace_ms: int = 30_000
    lock_heartbeat_interval_ms: int = 2_000
    lock_holder_dead_after_ms: int = 10_000

    # --- periodic jobs (beat_schedule.py holds the defaults) ------------------------
    beat_every_s: float | None = Field(default=None, gt=0)
    job_min_runtime_ms: dict[str, int] = Field(default_factory=dict)
    beat_standby_poll_s: float = Field(default=2.0, gt=0)
    # the beat leader lease (app/leader.py): a leader that stops renewing loses it within
    # the TTL; renewal runs well inside it
    beat_lease_ttl_ms: int = Field(default=10_000, gt=0)
    beat_lease_renew_ms: int = Field(default=2_000, gt=0)

    # --- interfaces ---------------------------------------------------------------
    api_token: SecretStr | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    flower_basic_auth: str | None = None
    celery_queue: str = "autonomy"
    # a Celery worker that takes no message for this long while messages wait in its queue
    # and its pool has room stops (exit 70) for its supervisor to restart; 0: never
    celery_watchdog_s: float = Field(default=120.0, ge=0)
    # /readyz: answer 503 while Redis is down (False: 200 with "redis": "degraded", for
    # deployments that keep serving from the database alone)
    readyz_redis_required: bool = True
    # set by `autonomy up` for each child it starts; /livez echoes it, so `up` knows the
    # answer came from its own child, not from whatever else holds the port
    start_nonce: str | None = None
    # the Host names the API answers to (SPEC 4.8): empty means the bind address
    # (api_host), localhost and the loopback literals; "*" allows any (behind a proxy that
    # checks it). Comma-separated.
    allowed_hosts: str = ""
    # origins besides the server's own that may send requests, comma-separated
    # (e.g. "https://ops.example")
    allowed_origins: str = ""

    # --- logs (app/logs.py): one format for the API, Celery worker and beat, `autonomy worker`
    # "text": a readable line (for a terminal); "json": one JSON object per line
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- control panel and `autonomy up` (issue 4: app/api/panel.py, app/local/up.py) ----------
    panel_refresh_ms: int = 3_000
    # the local default Redis address: with no REDIS_URL, `autonomy up` still starts its
    # embedded Redis, and names a Redis found listening here (leaving it alone); a setting
    # so tests can point it at a Redis of their own
    local_redis_probe_url: str = DEFAULT_REDIS_URL
    up_ready_timeout_s: float = 60.0
    up_stop_grace_s: float = 15.0
    # --- end of issue 4 block ------------------------------------------------------------
    # `autonomy up` restarts a child that exits: after first..max s (doubling while it keeps
    # dying within min_uptime of its start); that many quick deaths in a row stop the stack
    up_restart_backoff_first_s: float = Field(default=1.0, gt=0)
    up_restart_backoff_max_s: float = Field(default=30.0, gt=0)
    up_child_min_uptime_s: float = Field(default=10.0, ge=0)
    up_child_max_quick_deaths: int = Field(default=5, ge=1)

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _log_case(cls, v: object, info: object) -> object:
        if not isinstance(v, str):
            return v
        return v.strip().lower() if getattr(info, "field_name", "") == "log_format" \
            else v.strip().upper()

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read and validated once."""
    return Settings()
