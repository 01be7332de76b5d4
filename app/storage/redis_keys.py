"""Every Redis key autonomy uses: name, type, TTL, owner.

All keys start with ``Settings.redis_prefix`` (default ``autonomy:``), so a test or a
second deployment can share a server without touching another's keys.

=================================  ======  =====================================  ===========
key                                type    TTL                                    owner
=================================  ======  =====================================  ===========
``lease:{assignee}:{worker}``      string  lease TTL (set again on heartbeat)     leases.py
                                           JSON ``{taskId, token, expiresAtMs}``
``lane:{assignee}:leases``         zset    lease TTL, refreshed on each write     leases.py
                                           member task id, score lease expiry ms;
                                           ``claim:{worker}``: a claim in flight
                                           holding its slot (score: when it lapses)
                                           -- both on Redis's clock (``TIME``)
``lane:{assignee}:meta``           hash    none                                   leases.py
                                           ``paused`` 0/1, ``reason``, ``pausedAt``,
                                           ``maxInFlight`` -- a cache of the lane
                                           row; the DB confirms every refusal
``lane:{assignee}:guards``         list    none; capped to ``guard_log_max``      leases.py
                                           JSON guard hits (the audit of refused
                                           duplicate claims, kept off the DB)
``lane:{assignee}:wake``           list    2 x ``pickup_safety_poll_ms`` (>= 10   pickup.py
                                           s), set again on each push; capped to
                                           1,024. One entry per task made
                                           claimable; a waiting claim pops one
                                           (BRPOP): a hint, never the authority
``lane:{assignee}:poll``           string  ``pickup_block_s`` (``SET NX PX``,     pickup_hub.py
                                           not renewed): the token of the process
                                           leading the lane's safety poll (one
                                           claim per period, whatever the fleet's
                                           size)
``probe``                          string  60 s                                   leases.py
                                           written by the status and ``/readyz``
                                           probes: a Redis that answers PING but
                                           refuses writes (OOM, READONLY, MISCONF)
                                           is degraded too
``metrics``                        hash    none                                   metrics.py
                                           counters: claims, guard hits, ...
``clock_skew``                     hash    1 day, set again on each write         leases.py
                                           worker -> JSON ``{skewMs, atMs}``: the
                                           clock skew the worker reported with a
                                           claim, heartbeat or complete (SPEC 4.9;
                                           ``atMs`` on the database's clock)
``lock:{job}``                     hash    budget + grace (set again on extend)   locks.py
                                           ``token``, ``entry`` (the JSON the
                                           listing answers, with startedAt and
                                           startedAt + budget ms in ``elapsedMs``
                                           and ``overBudget``)
``lock:{job}:beat``                string  ``lock_holder_dead_after_ms`` (never   locks.py
                                           past the lock's), set again on beat
                                           the entry; gone = the holder is dead.
                                           Always the lock key + ``:beat`` (the
                                           scripts build it)
``locks:index``                    zset    none; members removed by the walk      locks.py
                                           the registry: member job, score
                                           startedAt ms (Redis's ``TIME``); every
                                           job whose lock may
                                           be held (added on acquire, dropped by
                                           collect/break once its lock is gone) --
                                           lists held locks without scanning the
                                           keyspace
``beat:leader``                    hash    ``beat_lease_ttl_ms`` (set again on    leader.py
                                           renew) ``token``, ``holder``, ``since``,
                                           ``renewedAt`` (ms, Redis's ``TIME``): the
                                           beat leader lease
``beat:standbys``                  zset    2 x lease TTL, refreshed on each write  leader.py
                                           member holder, score the ms it last
                                           stood by (Redis's ``TIME``); older than
                                           the TTL by Redis's now = gone
=================================  ======  =====================================  ===========

Celery's broker, result and event keys are Celery's own names under ``{prefix}celery:``
(kombu's ``global_keyprefix``, set in ``app/celery_app.py``), e.g.
``autonomy:celery:celery-task-meta-<id>``.
"""

from __future__ import annotations


class Keys:
    """Key templates for one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    # --- leases (leases.py) -------------------------------------------------------
    def worker_lease(self, assignee: str, worker: str) -> str:
        return f"{self.prefix}lease:{assignee}:{worker}"

    def lane_leases(self, assignee: str) -> str:
        return f"{self.prefix}lane:{assignee}:leases"

    def lane_meta(self, assignee: str) -> str:
        return f"{self.prefix}lane:{assignee}:meta"

    def lane_guards(self, assignee: str) -> str:
        return f"{self.prefix}lane:{assignee}:guards"

    # --- push pickup (pickup.py) -------------------------------------------------
    def lane_wake(self, assignee: str) -> str:
        return f"{self.prefix}lane:{assignee}:wake"

    def lane_poll(self, assignee: str) -> str:
        return f"{self.prefix}lane:{assignee}:poll"

    def lane_due(self, assignee: str, due_ms: int) -> str:
        """One waiter's turn to claim when the lane's delayed task falls due at ``due_ms``
        (``SET NX PX``, string; pickup.py)."""
        return f"{self.prefix}lane:{assignee}:due:{due_ms}"

    # --- the health probe (leases.py) ----------------------------------------------
    def probe(self) -> str:
        return f"{self.prefix}probe"

    # --- metrics (metrics.py) -----------------------------------------------------
    def metrics(self) -> str:
        return f"{self.prefix}metrics"

    def clock_skew(self) -> str:
        return f"{self.prefix}clock_skew"

    # --- run-locks (locks.py) -----------------------------------------------------
    def lock(self, job: str) -> str:
        return f"{self.prefix}lock:{job}"

    def lock_beat(self, job: str) -> str:
        return f"{self.prefix}lock:{job}:beat"

    def lock_registry(self) -> str:
        return f"{self.prefix}locks:index"

    # --- the beat leader lease (leader.py) ----------------------------------------
    def beat_leader(self) -> str:
        return f"{self.prefix}beat:leader"

    def beat_standbys(self) -> str:
        return f"{self.prefix}beat:standbys"
