"""How a worker talks to autonomy: the same actions, in-process or over HTTP.

``LocalClient`` dispatches through ``app.ops`` with a ``Context`` of its own (the worker
then needs ``DATABASE_URL`` / ``REDIS_URL``); ``HttpClient`` POSTs the same requests to a
running server's ``/api/autonomy`` with a bearer token. Both raise the same
``AutonomyError`` subclasses, so worker code never knows which one it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from app.errors import AutonomyError, Unavailable
from app.settings import Settings, get_settings
from app.storage.context import Context


class Client(ABC):
    """The actions a worker needs, over ``call(request) -> answer``."""

    settings: Settings

    @abstractmethod
    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one action (``{"action": ..., ...}``); raises ``AutonomyError`` on refusal."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (idempotent)."""

    def claim(self, lane: str, worker: str, *, wait_ms: int | None = None,
              clock_skew_ms: int | None = None, max_n: int | None = None) -> dict[str, Any]:
        """Claim the lane's next task (SPEC 4.1); with ``wait_ms``, an empty lane is waited
        on that long for work to arrive (push pickup) before the answer.
        ``clock_skew_ms``: this worker's clock skew as it measured it (SPEC 4.9).
        ``max_n``: up to that many leases (a prefetch), answered as ``leases``."""
        request: dict[str, Any] = {"action": "claim", "assignee": lane, "worker": worker}
        if wait_ms:
            request["waitMs"] = wait_ms
        if max_n is not None:
            request["max"] = max_n
        if clock_skew_ms is not None:
            request["clockSkewMs"] = clock_skew_ms
        return self.call(request)

    @property
    def claim_wait_ms(self) -> int:
        """How long a worker's claim on an empty lane waits per call."""
        return self.settings.worker_wait_ms

    def heartbeat(self, task_id: int, lease_token: str, *, clock_skew_ms: int | None = None
                  ) -> dict[str, Any]:
        """Extend a live lease (``clock_skew_ms`` as ``claim`` takes it)."""
        request: dict[str, Any] = {"action": "heartbeat", "taskId": task_id,
                                   "leaseToken": lease_token}
        if clock_skew_ms is not None:
            request["clockSkewMs"] = clock_skew_ms
        return self.call(request)

    def complete(self, task_id: int, lease_token: str, *, outcome: str,
                 reason: str | None = None, result: dict[str, Any] | None = None,
                 actor: str | None = None, claim_next: tuple[str, str] | None = None,
                 clock_skew_ms: int | None = None) -> dict[str, Any]:
        """Complete a leased task with ``success`` or a ``failure`` and its reason. With
        ``claim_next=(lane, worker)`` the answer's ``next`` is that worker's next claim
        (left out when it was refused: claim as usual then); ``clock_skew_ms`` as
        ``claim`` takes it."""
        request: dict[str, Any] = {
            "action": "complete", "taskId": task_id, "leaseToken": lease_token,
            "outcome": outcome, "validationReason": reason, "result": result, "actor": actor}
        if claim_next is not None:
            request["claimNext"] = {"assignee": claim_next[0], "worker": claim_next[1]}
        if clock_skew_ms is not None:
            request["clockSkewMs"] = clock_skew_ms
        return self.call(request)

    def complete_many(self, items: list[tuple[int, str, dict[str, Any] | None]], *,
                      claim_next: tuple[str, str] | None = None, max_n: int | None = None,
                      clock_skew_ms: int | None = None) -> dict[str, Any]:
        """Complete several leases with success in one request, ``(task id, token,
        result)`` each; ``results`` answers each alone. With ``claim_next``, ``next`` is
        that worker's next claim of up to ``max_n`` leases."""
        request: dict[str, Any] = {"action": "complete_many", "items": [
            {"taskId": t, "leaseToken": token, "result": r} for t, token, r in items]}
        if claim_next is not None:
            request["claimNext"] = {"assignee": claim_next[0], "worker": claim_next[1]}
        if max_n is not None:
            request["max"] = max_n
        if clock_skew_ms is not None:
            request["clockSkewMs"] = clock_skew_ms
        return self.call(request)

    def release(self, task_id: int, lease_token: str, *, actor: str | None = None
                ) -> dict[str, Any]:
        """Give a lease back without an outcome (the task is ``todo`` again at once)."""
        return self.call({"action": "release", "taskId": task_id, "leaseToken": lease_token,
                          "actor": actor})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalClient(Client):
    """Calls ``app.ops.dispatch`` in this process. Thread-safe: the engine pools
    connections and the Redis client is shared safely between threads."""

    def __init__(self, ctx: Context | None = None, *, settings: Settings | None = None) -> None:
        self._owned = ctx is None
        self.ctx = ctx if ctx is not None else Context.from_settings(settings)
        self.settings = self.ctx.settings

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Dispatch in-process."""
        from app import ops

        return ops.dispatch(self.ctx, request)

    def close(self) -> None:
        """Close the context if this client built it."""
        if self._owned:
            self.ctx.close()
            self._owned = False


def _error_classes() -> dict[str, type[AutonomyError]]:
    found: dict[str, type[AutonomyError]] = {}
    todo: list[type[AutonomyError]] = [AutonomyError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found


def error_from_wire(answer: dict[str, Any]) -> AutonomyError:
    """The ``AutonomyError`` an ``{"ok": false, "error": code, ...}`` answer stands for;
    an unknown code becomes the root class with ``error`` kept in its details."""
    code = str(answer.get("error") or "internal_error")
    message = str(answer.get("message") or code)
    details = {k: v for k, v in answer.items() if k not in ("ok", "error", "message")}
    cls = _error_classes().get(code)
    if cls is None:
        return AutonomyError(message, error=code, **details)
    return cls(message, **details)


class HttpClient(Client):
    """POSTs actions to ``{url}/api/autonomy`` with ``Authorization: Bearer <token>``.

    ``transport`` is for tests (an ``httpx`` transport); thread-safe like ``httpx.Client``.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 10.0,
                 settings: Settings | None = None, transport: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.settings = settings or get_settings()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                                  transport=transport)

    @property
    def claim_wait_ms(self) -> int:
        """The long poll's length: the server holds an empty claim this long."""
        return self.settings.worker_http_wait_ms

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """POST one action; maps ``ok: false`` answers back to their error class."""
        import httpx

        try:
            wait_s = request.get("waitMs", 0) / 1000 if request.get("action") == "claim" else 0
            resp = self._http.post("/api/autonomy", json=request,
                                   timeout=self.timeout_s + wait_s)
        except httpx.HTTPError as e:
            raise Unavailable(f"the autonomy API at {self.url} cannot be reached: {e}",
                              url=self.url) from e
        try:
            answer = resp.json()
        except (ValueError, RecursionError):
            answer = None
        if isinstance(answer, dict) and answer.get("ok") is True:
            return answer
        if isinstance(answer, dict) and "error" in answer:
            raise error_from_wire(answer)
        # not one of our answers: a proxy's error page, a wrong URL, a garbled body
        text = f"the autonomy API at {self.url} answered HTTP {resp.status_code}: " \
               f"{resp.text[:300]!r}"
        if resp.status_code in (502, 503, 504):
            raise Unavailable(text, url=self.url)  # a gateway's page: worth retrying
        raise AutonomyError(text, error=f"http_{resp.status_code}", url=self.url)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()
