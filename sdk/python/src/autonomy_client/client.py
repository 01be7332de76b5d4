"""``Client``: the actions a worker needs, POSTed to a running server's ``/api/autonomy``.

Every answer is the server's JSON object (``ok: true``); a refusal raises the
``AutonomyError`` subclass for its code (``autonomy_client.errors``). Thread-safe like the
``httpx.Client`` underneath: one client may serve a worker and its heartbeat thread.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from autonomy_client.errors import AutonomyError, InvalidInput, Unavailable, error_from_answer

DEFAULT_WAIT_MS = 10_000  # how long the server holds a claim on an empty lane (long poll)


class Client:
    """POSTs ``{"action": ...}`` requests to ``{url}/api/autonomy`` with
    ``Authorization: Bearer <token>`` (when a token is given).

    ``timeout_s`` bounds each request; a claim with ``waitMs`` gets that much longer.
    ``transport`` is passed to ``httpx.Client`` (tests, proxies, unix sockets).
    """

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 10.0,
                 wait_ms: int = DEFAULT_WAIT_MS, transport: httpx.BaseTransport | None = None
                 ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.wait_ms = wait_ms
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                                  transport=transport)

    # --- the actions ------------------------------------------------------------------

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """POST one action and answer the server's ``ok: true`` object; raises the error
        class of an ``ok: false`` answer, ``Unavailable`` when the API cannot be reached
        (or a gateway answers 502/503/504), ``AutonomyError`` for anything else."""
        wait_s = (request.get("waitMs") or 0) / 1000 if request.get("action") == "claim" else 0
        try:
            body = json.dumps(request, allow_nan=False).encode()
        except (TypeError, ValueError) as e:  # e.g. a result holding a set: never sent
            raise InvalidInput(f"the request cannot be sent as JSON: {e}") from e
        try:
            resp = self._http.post("/api/autonomy", content=body,
                                   headers={"Content-Type": "application/json"},
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
            raise error_from_answer(answer)
        # not one of the API's answers: a proxy's error page, a wrong URL, a garbled body
        text = (f"the autonomy API at {self.url} answered HTTP {resp.status_code}: "
                f"{resp.text[:300]!r}")
        if resp.status_code in (502, 503, 504):
            raise Unavailable(text, url=self.url)
        raise AutonomyError(text, code=f"http_{resp.status_code}", url=self.url)

    def create(self, lane: str, title: str, *, payload: dict[str, Any] | None = None,
               priority: int | None = None, dedupe_key: str | None = None,
               delay_s: float | None = None) -> dict[str, Any]:
        """Create a task in ``lane``; the answer's ``task`` is the new task."""
        request: dict[str, Any] = {"action": "create", "assignee": lane, "title": title}
        for key, value in (("payload", payload), ("priority", priority),
                           ("dedupeKey", dedupe_key), ("delayS", delay_s)):
            if value is not None:
                request[key] = value
        return self.call(request)

    def claim(self, lane: str, worker: str, *, wait_ms: int | None = None,
              max_n: int | None = None) -> dict[str, Any]:
        """Claim the lane's next task: the answer has ``task`` and ``lease`` (``{token,
        expiresAt}``), or ``task: null`` when the lane is empty, or a ``guard`` when the
        lane is full. With ``wait_ms`` the server holds a claim on an empty lane that long
        and answers as soon as a task arrives (push pickup by long poll). With ``max_n``
        (a prefetch) it grants up to that many leases, counting those the worker already
        holds in the lane, each its own: ``leases`` lists them, ``{task, lease}`` each."""
        request: dict[str, Any] = {"action": "claim", "assignee": lane, "worker": worker}
        if wait_ms:
            request["waitMs"] = wait_ms
        if max_n is not None:
            request["max"] = max_n
        return self.call(request)

    def heartbeat(self, task_id: int, lease_token: str) -> dict[str, Any]:
        """Extend a live lease; the answer's ``lease`` has the new ``expiresAt``."""
        return self.call({"action": "heartbeat", "taskId": task_id, "leaseToken": lease_token})

    def complete(self, task_id: int, lease_token: str, *, outcome: str,
                 reason: str | None = None, result: dict[str, Any] | None = None,
                 claim_next: tuple[str, str] | None = None) -> dict[str, Any]:
        """Record ``success`` or a ``failure`` with its ``reason`` (the breaker's
        fingerprint source). With ``claim_next=(lane, worker)`` the same call claims that
        worker's next task and answers it as ``next`` (left out when that claim was
        refused or found nothing)."""
        request: dict[str, Any] = {"action": "complete", "taskId": task_id,
                                   "leaseToken": lease_token, "outcome": outcome}
        if reason is not None:
            request["validationReason"] = reason
        if result is not None:
            request["result"] = result
        if claim_next is not None:
            request["claimNext"] = {"assignee": claim_next[0], "worker": claim_next[1]}
        return self.call(request)

    def complete_many(self, items: list[tuple[int, str, dict[str, Any] | None]], *,
                      claim_next: tuple[str, str] | None = None,
                      max_n: int | None = None) -> dict[str, Any]:
        """Record the success of several leased tasks, ``(task_id, lease_token, result)``
        each, in one request (one statement and one commit on the server). The answer's
        ``results`` has one entry per item, in order: ``{ok: true, task}``, or ``{ok:
        false, error, message, taskId}`` for an item refused alone (a stale token refuses
        its own item, never the others). With ``claim_next=(lane, worker)`` the same call
        hands over up to ``max_n`` next leases as ``next`` (a claim's answer)."""
        request: dict[str, Any] = {"action": "complete_many", "items": [
            {"taskId": tid, "leaseToken": token, **({} if result is None else {"result": result})}
            for tid, token, result in items]}
        if claim_next is not None:
            request["claimNext"] = {"assignee": claim_next[0], "worker": claim_next[1]}
            if max_n is not None:
                request["max"] = max_n
        return self.call(request)

    def release(self, task_id: int, lease_token: str) -> dict[str, Any]:
        """Give a lease back without an outcome: the task is claimable again at once."""
        return self.call({"action": "release", "taskId": task_id, "leaseToken": lease_token})

    # --- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (idempotent)."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
