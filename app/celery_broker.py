"""The Celery broker transport: kombu's Redis transport, with one crash on a lost broker
turned into the connection error it is.

After its Redis restarts (or stalls past the socket timeout), a Celery worker's consumer
collects the broken connection and then closes it (``Consumer.on_connection_error_after_
connected``). Collecting can end with the transport's ``client`` cleared while the
consumer's channel is still open and holds unacknowledged messages; closing that channel
restores them, which builds a new Redis pool from ``transport.client`` -- ``None`` --
and raises ``AttributeError: 'NoneType' object has no attribute 'hostname'`` (kombu 5.7;
kombu#582 had the same shape). That error is not a connection error, so it escapes the
consumer's ``ignore_errors``, Celery logs "Unrecoverable error" and the worker exits 1:
every Redis restart with messages in flight killed the worker (the fault suite saw it on
each ``kill -9`` of Redis).

Here the channel says the broker connection is gone with a Redis ``ConnectionError``
instead; the close ignores it and the consumer reconnects as it does for any other
connection loss. The messages it could not restore were in the Redis that went away (or
stay in its unacked set, where kombu's visibility timeout brings them back); a check job
expires with its period and the next period sends it again.

``install()`` (called by ``app.celery_app``) makes it the transport of the ``redis``,
``rediss`` and ``sentinel`` URL schemes in the process, so broker URLs keep their scheme
(Flower picks its broker view by it) and every kombu connection of the worker, beat and
Flower uses it.
"""

from __future__ import annotations

from typing import Any

import kombu.transport
import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError(
                "the broker connection was closed (a lost Redis); not reconnecting a channel "
                "that is being closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(kombu_redis.SentinelChannel):
    # the same fix for a broker found through Redis Sentinel (``sentinel://``)
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError(
                "the broker connection was closed (a lost Redis); not reconnecting a channel "
                "that is being closed")
        return super()._connparams(asynchronous=asynchronous)


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


TRANSPORTS = {"redis": f"{__name__}:Transport", "rediss": f"{__name__}:Transport",
              "sentinel": f"{__name__}:SentinelTransport"}
SCHEMES = tuple(TRANSPORTS)


def install() -> None:
    """Resolve the ``redis``/``rediss``/``sentinel`` schemes to these transports
    (idempotent)."""
    for scheme, transport in TRANSPORTS.items():
        kombu.transport.TRANSPORT_ALIASES[scheme] = transport
        kombu.transport._transport_cache.pop(scheme, None)  # resolved before: again
