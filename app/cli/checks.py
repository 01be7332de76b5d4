"""CLI for the periodic checks: ``autonomy check handoff|readiness|self-heal|status`` runs
one check inline under its run-lock; ``autonomy status`` prints the status payload;
``autonomy incident set critical|warning|ok --reason ...`` writes the ops incident state;
``autonomy locks`` lists the held run-locks and the beat leader lease; ``autonomy probe
ready|beat`` are the health probes for containers (exit 0 healthy, 1 not)."""

from __future__ import annotations

from typing import Any

import typer

from app import ops, principal, validate
from app.cli.complete import one_of
from app.cli.output import emit, human_duration, human_time, run, table, want_json
from app.errors import AutonomyError, InvalidInput
from app.ops import probes, run_locks
from app.ops.checks import jobs
from app.storage.context import Context

# what people type -> the job's name in beat_schedule.JOBS
CHECK_NAMES = {"handoff": "handoff_health", "readiness": "readiness", "self-heal": "self_heal",
               "status": "status", "retention": "retention"}

JsonOpt = typer.Option(None, "--json", help="Print JSON (the default when piped).")


def _with_ctx(fn: Any) -> Any:
    def go() -> dict[str, Any]:
        ctx = Context.from_settings()
        try:
            return dict(fn(ctx))
        finally:
            ctx.close()
    return go


def _locks_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no run-lock is held"
    return table(rows, ["job", "holder", "startedAt", "elapsedMs", "budgetMs", "overBudget",
                        "holderAlive"])


def beat_line(beat: dict[str, Any]) -> str:
    """The beat leader lease in one line (it is not a run-lock: no budget, a TTL)."""
    standbys = ", ".join(beat.get("standbys") or []) or "none"
    if not beat.get("leader"):
        return (f"beat leader: none (lease TTL {beat['ttlMs']} ms); standbys: {standbys}")
    return (f"beat leader: {beat['leader']} since {beat['since']}, lease renewed "
            f"{beat['renewedAt']} (TTL {beat['ttlMs']} ms); standbys: {standbys}")


def _state(part: dict[str, Any], key: str = "state") -> str:
    value = part.get(key) or part.get("error") or "unknown"
    return f"{value} (stale)" if part.get("stale") else str(value)


def status_lines(a: dict[str, Any]) -> str:
    """The status payload for a terminal: the verdicts first, then run-locks, jobs, lanes
    and fingerprints as tables (``--json`` or a pipe gives the payload itself)."""
    incident = a.get("opsIncident") or {}
    lines = [f"status at {human_time(a.get('generatedAt'))} · redis {a.get('redis')}",
             f"handoff    {_state(a.get('handoff') or {})}",
             f"readiness  {_state(a.get('readiness') or {})}",
             f"incident   {_state(incident, 'status')}"
             + (f": {incident['reason']}" if incident.get("reason") else ""),
             beat_line(a["beat"]) if a.get("beat") else "beat leader: unknown", "",
             "run-locks:", _locks_table(a.get("workflowHealth", {}).get("runLocks") or []), ""]
    jobs = [{"job": name, **job} for name, job in
            (a.get("workflowHealth", {}).get("jobs") or {}).items()]
    if jobs:
        lines += ["jobs:", table(jobs, ["job", "schedule", "lastRunAt", "durationMs", "ok",
                                        "skipped", "missed", "failures"]), ""]
    lanes = [{**lane, **{k: (lane.get("counts") or {}).get(k, 0)
                         for k in ("todo", "in_progress")}}
             for lane in a.get("lanes") or []]
    lines += ["lanes:", table(lanes, ["assignee", "paused", "pausedReason", "maxInFlight",
                                      "todo", "in_progress"])
              if lanes else "no lane has tasks yet"]
    if a.get("fingerprints"):
        lines += ["", "recent failure fingerprints:",
                  table(a["fingerprints"], ["fingerprint", "count", "threshold", "lastAt"])]
    return "\n".join(lines)


def _check_line(a: dict[str, Any]) -> str:
    if a.get("skipped"):
        return (f"{a['job']}: skipped ({a['skipped']}): held by {a.get('holder')} "
                f"for {human_duration(a.get('elapsedMs'))}")
    head = f"{a['job']}: ok in {human_duration(a.get('durationMs'))}"
    if "state" in a:
        head += f" -- {a['state']}"
    return head


def register(app: typer.Typer) -> None:
    """Add ``check``, ``status``, ``incident`` and ``locks`` to the CLI."""
    incident_app = typer.Typer(no_args_is_help=True, help="The ops incident state.")
    app.add_typer(incident_app, name="incident")
    probe_app = typer.Typer(no_args_is_help=True,
                            help="Health probes for containers: exit 0 healthy, 1 not.")
    app.add_typer(probe_app, name="probe")

    def _probe(answer: dict[str, Any], as_json: bool, line: str) -> None:
        emit(answer, as_json, lambda _: line)
        if not answer["ok"]:
            raise typer.Exit(1)

    @probe_app.command("ready")
    def probe_ready(as_json: bool | None = JsonOpt) -> None:
        """Database reachable and migrated, Redis reachable (what GET /readyz answers)."""
        answer = _with_ctx(probes.ready)()
        _probe(answer, want_json(as_json),
               "ready" if answer["ok"] else f"not ready: {answer.get('message')}")

    @probe_app.command("beat")
    def probe_beat(holder_prefix: str | None = typer.Option(
            None, help="Whose beat (default: this host's, 'HOSTNAME:')."),
            as_json: bool | None = JsonOpt) -> None:
        """A beat of this host leads or stands by (renewed its lease or said it stands by
        within the lease TTL). A standby passes; a beat cut off from Redis does not."""
        try:
            answer = _with_ctx(lambda ctx: probes.beat(ctx, holder_prefix))()
        except AutonomyError as e:
            answer = {**e.to_wire(), "role": None}
        _probe(answer, want_json(as_json),
               f"beat: {answer['role']}" if answer["ok"] else f"beat: {answer['message']}")

    @app.command("check")
    def check(name: str = typer.Argument(..., help=" | ".join(CHECK_NAMES),
                                         autocompletion=one_of(CHECK_NAMES)),
              as_json: bool | None = JsonOpt) -> None:
        """Run one check now, under its run-lock, and print its result."""
        j = want_json(as_json)

        def go(ctx: Context) -> dict[str, Any]:
            job = CHECK_NAMES.get(name)
            if job is None:
                raise InvalidInput(f"unknown check {name!r}: one of "
                                   f"{', '.join(CHECK_NAMES)}", field="check")
            return jobs.run_job(ctx, job, holder=run_locks.holder_name("cli"))

        run(_with_ctx(go), j, _check_line)

    @app.command("status")
    def status(as_json: bool | None = JsonOpt) -> None:
        """The status payload (what the API, the panel and Flower show)."""
        run(_with_ctx(lambda ctx: ops.dispatch(ctx, {"action": "status"})),
            want_json(as_json), status_lines)

    @incident_app.command("set")
    def incident_set(status: str = typer.Argument(
            ..., help=" | ".join(reversed(validate.INCIDENT_STATUSES)),
            autocompletion=one_of(validate.INCIDENT_STATUSES)),
                     reason: str | None = typer.Option(None, help="Why (shown to operators)."),
                     actor: str | None = typer.Option(
                         None, help="A note beside the recorded actor (the OS user)."),
                     as_json: bool | None = JsonOpt) -> None:
        """Write the ops incident state, with the time it was written (recorded as the OS
        user: the CLI acts on the database directly, as operator)."""
        request = {"action": "ops_incident", "status": status, "reason": reason,
                   "actor": actor}

        def go(ctx: Context) -> dict[str, Any]:
            with principal.acting(principal.local_operator()):
                return ops.dispatch(ctx, request)

        run(_with_ctx(go),
            want_json(as_json),
            lambda a: f"ops incident: {a['opsIncident']['status']} "
                      f"({a['opsIncident']['reason'] or 'no reason'})")

    @app.command("locks")
    def locks_cmd(as_json: bool | None = JsonOpt) -> None:
        """The run-locks held now, with elapsed time against budget, and the beat leader
        lease (shown apart: it has a TTL, not a budget)."""
        def go(ctx: Context) -> dict[str, Any]:
            return {"ok": True, **run_locks.view(ctx)}

        run(_with_ctx(go), want_json(as_json),
            lambda a: _locks_table(a["runLocks"]) + "\n" + beat_line(a["beat"]))
