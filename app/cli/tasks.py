"""``autonomy tasks``, ``cancel`` and ``requeue``: the task lifecycle from the command line
(SPEC 4.11). A table on a terminal, JSON when piped (``app.cli.output``)."""

from __future__ import annotations

from typing import Any

import typer

from app import ops, principal, validate
from app.cli.complete import one_of
from app.cli.output import run, table, want_json
from app.storage.context import Context

JsonOpt = typer.Option(None, "--json", help="Print JSON (the default when piped).")

COLUMNS = ["id", "assignee", "kind", "status", "priority", "attempts", "claimedBy",
           "notBefore", "updatedAt", "title"]


def _tasks_table(a: dict[str, Any]) -> str:
    lines = [table(a["tasks"], COLUMNS) if a["tasks"] else "no tasks"]
    if a.get("nextAfter") is not None:
        lines.append(f"more: --after {a['nextAfter']}")
    return "\n".join(lines)


def _one(a: dict[str, Any]) -> str:
    line = table([a["task"]], ["id", "assignee", "status", "attempts",
                               "lastValidationReason", "title"])
    return line + ("\n(already cancelled)" if a.get("alreadyCancelled") else "")


def call(request: dict[str, Any], as_json: bool | None, human: Any) -> dict[str, Any]:
    """Dispatch one action and print its answer (``app.cli.call``'s twin: an extension
    does not import the package that loads it)."""
    def go() -> dict[str, Any]:
        ctx = Context.from_settings()
        try:  # on the database directly: an operator, recorded as the OS user
            with principal.acting(principal.local_operator()):
                return ops.dispatch(ctx, request)
        finally:
            ctx.close()

    return run(go, want_json(as_json), human)


def register(app: typer.Typer) -> None:
    """Add ``tasks``, ``cancel`` and ``requeue`` to the CLI."""

    @app.command("tasks")
    def tasks_cmd(lane: str | None = typer.Option(None, "--lane", help="Only this lane."),
                  status: str | None = typer.Option(
                      None, "--status", help=", ".join(validate.TASK_STATUSES),
                      autocompletion=one_of(validate.TASK_STATUSES)),
                  kind: str | None = typer.Option(
                      None, "--kind", help=" or ".join(validate.TASK_KINDS),
                      autocompletion=one_of(validate.TASK_KINDS)),
                  limit: int = typer.Option(50, "--limit", help="At most this many."),
                  after: int | None = typer.Option(
                      None, "--after", help="The page after this task id (nextAfter)."),
                  as_json: bool | None = JsonOpt) -> None:
        """List tasks, newest first."""
        call({"action": "tasks", "assignee": lane, "status": status, "kind": kind,
              "limit": limit, "after": after}, as_json, _tasks_table)

    @app.command("cancel")
    def cancel_cmd(task_id: int, actor: str | None = typer.Option(
                       None, help="A note kept beside the recorded actor (the OS user)."),
                   as_json: bool | None = JsonOpt) -> None:
        """Cancel a todo or in-progress task (its worker stops the command)."""
        call({"action": "cancel", "taskId": task_id, "actor": actor}, as_json, _one)

    @app.command("requeue")
    def requeue_cmd(task_id: int, actor: str | None = typer.Option(
                        None, help="A note kept beside the recorded actor (the OS user)."),
                    as_json: bool | None = JsonOpt) -> None:
        """Bring a dead task back to todo, its attempts reset."""
        call({"action": "requeue", "taskId": task_id, "actor": actor}, as_json, _one)
