"""``autonomy``: thin commands over the operations. JSON with ``--json`` (or when piped),
tables otherwise (durations and times made readable; JSON keeps milliseconds and ISO
times); exit 0 on ``ok``, non-zero with the error code on stderr otherwise.

``autonomy --version`` prints the version; ``autonomy --install-completion`` /
``--show-completion`` install or print shell completion (Typer's, for bash, zsh, fish
and PowerShell).

Command groups that live in their own modules (checks, serving, workers) register
themselves through ``EXTENSIONS``: each is ``module:register`` taking the Typer app.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import typer
from pydantic import ValidationError

from app import __version__, logs, ops, principal, validate
from app.cli.complete import one_of
from app.cli.output import fail, human_time, run, table, want_json
from app.errors import AutonomyError, InvalidInput, InvalidSettings
from app.settings import describe_invalid
from app.storage.context import Context

app = typer.Typer(add_completion=True, no_args_is_help=True,
                  help="Run fleets of autonomous workers safely.",
                  # -h too, on every command (sub-commands inherit it)
                  context_settings={"help_option_names": ["-h", "--help"]})

JsonOpt = typer.Option(None, "--json", help="Print JSON (the default when piped).")
ActorOpt = typer.Option(None, help="A note kept beside the recorded actor (the OS user).")

EXTENSIONS = [
    "app.cli.checks:register",
    "app.cli.db:register",
    "app.cli.flower:register",
    "app.cli.migrations:register",
    "app.cli.serve:register",
    "app.cli.tasks:register",
    "app.cli.token:register",
    "app.cli.worker:register",
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"autonomy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version,
                                       is_eager=True, help="Print the version and exit.")
          ) -> None:
    """Run fleets of autonomous workers safely."""


def context() -> Context:
    """The process context from settings (environment)."""
    return Context.from_settings()


def call(request: dict[str, Any], as_json: bool | None, human: Any = None) -> dict[str, Any]:
    """Dispatch one action through ``app.ops`` and print the answer."""
    j = want_json(as_json)

    def go() -> dict[str, Any]:
        ctx = context()
        try:  # on the database directly: an operator, recorded as the OS user
            with principal.acting(principal.local_operator()):
                return ops.dispatch(ctx, request)
        finally:
            ctx.close()

    return run(go, j, human)


def _task_line(a: dict[str, Any]) -> str:
    t = a.get("task")
    lines = []
    if a.get("guard"):
        lines.append(f"guard: {a['guard']}")
    if t is None:
        lines.append("no task to claim")
    else:
        lines.append(table([t], ["id", "assignee", "status", "priority", "attempts",
                                 "claimedBy", "lanePaused", "title"]))
    if a.get("lease"):
        lines.append(f"lease token: {a['lease']['token']}  "
                     f"expires: {human_time(a['lease']['expiresAt'])}")
    for k in ("failureFingerprint", "fingerprintCount", "lanePaused", "remediationTaskId"):
        if k in a:
            lines.append(f"{k}: {a[k]}")
    return "\n".join(lines)


@app.command()
def create(assignee: str, title: str,
           priority: int = typer.Option(0, help="Higher is claimed first."),
           payload: str | None = typer.Option(None, help="A JSON object."),
           dedupe_key: str | None = typer.Option(
               None, "--dedupe-key", help="Idempotent: a second create answers the first."),
           delay_s: float | None = typer.Option(None, "--delay-s",
                                                help="Not claimable for this many seconds."),
           not_before: str | None = typer.Option(
               None, "--not-before", help="Not claimable before this ISO time (with zone)."),
           as_json: bool | None = JsonOpt) -> None:
    """Queue a task in a lane."""
    call({"action": "create", "assignee": assignee, "title": title, "priority": priority,
          "payload": payload, "dedupeKey": dedupe_key, "delayS": delay_s,
          "notBefore": not_before}, as_json, _task_line)


@app.command()
def claim(assignee: str, worker: str,
          max_n: int | None = typer.Option(
              None, "--max", min=1, help="Up to this many leases at once (a prefetch)."),
          as_json: bool | None = JsonOpt) -> None:
    """Claim the lane's next task under a lease (with --max, up to that many)."""
    call({"action": "claim", "assignee": assignee, "worker": worker, "max": max_n}, as_json,
         _task_line)


@app.command()
def heartbeat(task_id: int, lease_token: str, as_json: bool | None = JsonOpt) -> None:
    """Extend a live lease."""
    call({"action": "heartbeat", "taskId": task_id, "leaseToken": lease_token}, as_json,
         lambda a: f"lease extended to {a['lease']['expiresAt']}")


@app.command()
def complete(task_id: int, lease_token: str,
             outcome: str = typer.Option("success", help=" or ".join(validate.OUTCOMES),
                                         autocompletion=one_of(validate.OUTCOMES)),
             reason: str | None = typer.Option(None, "--reason",
                                               help="Validation reason (for a failure)."),
             result: str | None = typer.Option(None, help="A JSON object."),
             as_json: bool | None = JsonOpt) -> None:
    """Complete a leased task with success or a validation failure."""
    call({"action": "complete", "taskId": task_id, "leaseToken": lease_token,
          "outcome": outcome, "validationReason": reason, "result": result},
         as_json, _task_line)


@app.command()
def release(task_id: int, lease_token: str, as_json: bool | None = JsonOpt) -> None:
    """Give a lease back without an outcome."""
    call({"action": "release", "taskId": task_id, "leaseToken": lease_token}, as_json,
         lambda a: f"task {a['taskId']} released")


def _lane_line(a: dict[str, Any]) -> str:
    lane = a.get("lane")
    return table([lane], ["assignee", "paused", "pausedReason", "pausedAt", "resumedAt",
                          "maxInFlight", "maxAttempts", "backoffBaseS", "backoffCapS"]
                 ) if lane else "lane has no tasks yet"


@app.command()
def pause(assignee: str, reason: str | None = typer.Option(None),
          actor: str | None = ActorOpt, as_json: bool | None = JsonOpt) -> None:
    """Pause a lane (idempotent)."""
    call({"action": "pause_lane", "assignee": assignee, "reason": reason, "actor": actor},
         as_json, _lane_line)


@app.command()
def resume(assignee: str, actor: str | None = ActorOpt,
           reason: str | None = typer.Option(None), as_json: bool | None = JsonOpt) -> None:
    """Resume a lane (idempotent)."""
    call({"action": "resume_lane", "assignee": assignee, "actor": actor, "reason": reason},
         as_json, _resume_line)


def _resume_line(a: dict[str, Any]) -> str:
    said = "resumed (it was paused)" if a.get("wasPaused") else "was not paused: unchanged"
    return f"{said}\n{_lane_line(a)}"


@app.command("lane")
def lane_cmd(assignee: str,
             max_in_flight: int | None = typer.Option(None, "--max-in-flight"),
             max_attempts: int | None = typer.Option(
                 None, "--max-attempts", help="Failures after which a task ends dead."),
             backoff_base_s: float | None = typer.Option(
                 None, "--backoff-base-s", help="A failed task waits min(cap, base*2^n) s."),
             backoff_cap_s: float | None = typer.Option(None, "--backoff-cap-s"),
             actor: str | None = ActorOpt, as_json: bool | None = JsonOpt) -> None:
    """Set how many live leases a lane allows at once, and its task lifecycle."""
    call({"action": "configure_lane", "assignee": assignee, "maxInFlight": max_in_flight,
          "maxAttempts": max_attempts, "backoffBaseS": backoff_base_s,
          "backoffCapS": backoff_cap_s, "actor": actor}, as_json, _lane_line)


@app.command()
def fingerprints(fingerprint: str, window_hours: float | None = typer.Option(None),
                 as_json: bool | None = JsonOpt) -> None:
    """Count one failure fingerprint's hits in a window (default 24 h). FINGERPRINT is
    LANE:REASON, the reason as a worker wrote it or as the breaker keeps it: it is
    normalised as the breaker does (case, numbers, ids, hashes) before it is counted."""
    call({"action": "fingerprint_count", "fingerprint": fingerprint,
          "windowHours": window_hours}, as_json,
         lambda a: f"{a['fingerprint']}: {a['count']} in {a['windowHours']} h "
                   f"(threshold {a['threshold']})")


@app.command()
def history(task_id: int | None = typer.Option(None, "--task"),
            assignee: str | None = typer.Option(None, "--lane"),
            as_json: bool | None = JsonOpt) -> None:
    """A task's or a lane's events: why was this refused, why is this lane paused."""
    call({"action": "history", "taskId": task_id, "assignee": assignee}, as_json,
         lambda a: table(a["events"], ["at", "kind", "taskId", "actor", "actorNote",
                                        "reason"]))


def _load_extensions() -> None:
    for spec in EXTENSIONS:
        mod, _, fn = spec.partition(":")
        getattr(importlib.import_module(mod), fn)(app)


def main() -> None:
    """Console script entry point. Whatever the input, the answer is an exit code and an
    ``error: <code>: <message>`` line, never a traceback (``AUTONOMY_DEBUG=1`` shows one)."""
    try:  # one-shot commands log warnings only; serve and worker reconfigure for INFO
        logs.configure(process="cli", level=logging.WARNING)
    except ValueError:  # a bad setting: the command itself reports it
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _load_extensions()
    try:
        code = app(standalone_mode=False)
    except SystemExit:
        raise
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except _USAGE_ERROR as e:
        usage: Any = e
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(usage.format_message(), err=True)
            sys.exit(2)
        if usage.ctx is not None:
            typer.echo(usage.ctx.get_usage(), err=True)
        _die(InvalidInput(usage.format_message()))
    except AutonomyError as e:
        _die(e)
    except ValidationError as e:  # the settings (a malformed REDIS_URL...): not a crash
        _die(InvalidSettings(describe_invalid(e)))
    except RecursionError:
        _die(InvalidInput("the input nests too deeply"))
    except Exception as e:
        if os.environ.get("AUTONOMY_DEBUG"):
            raise
        _die(AutonomyError(f"unexpected {type(e).__name__}: {str(e)[:300]}; "
                           "set AUTONOMY_DEBUG=1 for the traceback"))
    sys.exit(code if isinstance(code, int) else 0)


# the command-line parser's usage error (typer ships its own click)
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__
                                     if c.__name__ == "UsageError")


def _die(err: AutonomyError) -> None:
    try:
        fail(err, want_json(None))
    except typer.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
