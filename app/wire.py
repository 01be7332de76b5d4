"""Rows to JSON answers: camelCase field names, ISO-8601 UTC times."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.clock import iso


def task(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A task as the API shows it. The lease token is never shown: only its holder has it."""
    return {
        "id": row["id"],
        "title": row["title"],
        "assignee": row["assignee"],
        "kind": row["kind"],
        "status": row["status"],
        "priority": row["priority"],
        "payload": row["payload"],
        "result": row.get("result"),
        "attempts": row["attempts"],
        "claimedBy": row["claimed_by"],
        "leaseExpiresAt": iso(row["lease_expires_at"]),
        "failureFingerprint": row["failure_fingerprint"],
        "lastValidationReason": row["last_validation_reason"],
        "lanePaused": bool(row["lane_paused"]),
        "lanePausedReason": row["lane_paused_reason"],
        "lanePausedAt": iso(row["lane_paused_at"]),
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "completedAt": iso(row["completed_at"]),
        "notBefore": iso(row.get("not_before")),
        "dedupeKey": row.get("dedupe_key"),
    }


def lane(row: Mapping[Any, Any], counts: Mapping[str, int] | None = None) -> dict[str, Any]:
    out = {
        "assignee": row["assignee"],
        "paused": bool(row["paused"]),
        "pausedReason": row["paused_reason"],
        "pausedAt": iso(row["paused_at"]),
        "resumedAt": iso(row["resumed_at"]),
        "maxInFlight": row["max_in_flight"],
        # the task lifecycle (SPEC 4.11); null: the settings' default applies
        "maxAttempts": row.get("max_attempts"),
        "backoffBaseS": row.get("backoff_base_s"),
        "backoffCapS": row.get("backoff_cap_s"),
    }
    if counts is not None:
        # the live work only: see store.lane_status_counts
        out["counts"] = {"todo": int(counts.get("todo", 0)),
                         "in_progress": int(counts.get("in_progress", 0)),
                         "dead": int(counts.get("dead", 0))}
    return out


def event(row: Mapping[Any, Any]) -> dict[str, Any]:
    """An event as answered: ``actor`` is who did it (under credentials: the
    credential's name), ``actorNote`` the actor the request itself named, if another."""
    data = row["data"] or {}
    return {
        "id": row["id"],
        "at": iso(row["at"]),
        "kind": row["kind"],
        "assignee": row["assignee"],
        "taskId": row["task_id"],
        "actor": row["actor"],
        "actorNote": data.get("actorNote") if isinstance(data, dict) else None,
        "reason": row["reason"],
        "data": data,
    }
