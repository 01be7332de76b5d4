"""Small CLI habits: ``-h`` is ``--help`` everywhere; ``status`` reads as text on a
terminal and stays JSON on a pipe; ``fingerprints`` takes a reason as a worker wrote it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from typer.testing import CliRunner

from app import ops
from app.cli import _load_extensions
from app.cli import app as cli_app
from app.cli.checks import status_lines
from app.ops import breaker, lanes
from app.storage.context import Context
from tests.test_breaker import fail_next
from tests.test_cli import cli, cli_env
from tests.test_cli_output import AUTONOMY, on_a_terminal

__all__ = ["cli_env"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    if not any(c.name == "status" for c in cli_app.registered_commands):
        _load_extensions()
    return CliRunner()


@pytest.mark.parametrize("args", [[], ["db"], ["claim"], ["db", "stamp"], ["status"],
                                  ["worker"]])
def test_h_is_help_on_every_command(runner: CliRunner, args: list[str]) -> None:
    short = runner.invoke(cli_app, [*args, "-h"])
    assert short.exit_code == 0, short.output
    assert short.output == runner.invoke(cli_app, [*args, "--help"]).output
    assert "Usage: " in short.output


def test_fingerprints_count_a_reason_as_a_worker_wrote_it(ctx: Context) -> None:
    lanes.create(ctx, assignee="h1c", title="t")
    fail_next(ctx, "test 42 failed after 1.5 s", lane="h1c")
    answer = ops.dispatch(ctx, {"action": "fingerprint_count",
                                "fingerprint": "h1c:Test 99 failed after 0.9 s"})
    assert answer["fingerprint"] == "h1c:test <n> failed after <n> s"
    assert answer["count"] == 1
    same = ops.dispatch(ctx, {"action": "fingerprint_count",
                              "fingerprint": answer["fingerprint"]})  # normalised: unchanged
    assert (same["fingerprint"], same["count"]) == (answer["fingerprint"], 1)
    assert breaker.normalise_fingerprint("no colon here") == "no colon here"


def test_status_for_a_terminal_leads_with_the_verdicts_then_tables(ctx: Context) -> None:
    lanes.create(ctx, assignee="coder", title="t")
    fail_next(ctx, "tests failed")
    text = status_lines(ops.dispatch(ctx, {"action": "status"}))
    lines = text.splitlines()
    assert lines[0].startswith("status at ") and lines[0].endswith("· redis ok")
    assert lines[1].split() == ["handoff", "missing"]
    assert lines[3].split() == ["incident", "ok"]
    assert lines[4].startswith("beat leader: none")
    assert "no run-lock is held" in text and "JOB " in text and "SCHEDULE" in text
    lane_row = next(ln for ln in lines if ln.startswith("coder "))
    assert lane_row.split()[:2] == ["coder", "no"]
    assert any(ln.startswith("coder:tests failed ") for ln in lines)  # its fingerprint
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.slow
def test_status_is_text_on_a_terminal_and_json_on_a_pipe(cli_env: dict[str, str]) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    human = on_a_terminal(cli_env, "status")
    assert human.startswith("status at ") and "lanes:" in human
    piped = cli(cli_env, "status")
    assert piped.returncode == 0 and json.loads(piped.stdout)["ok"] is True


@pytest.mark.parametrize(("words", "expected"), [
    ("autonomy check ", ["handoff", "readiness", "self-heal", "status", "retention"]),
    ("autonomy check re", ["readiness", "retention"]),
    ("autonomy complete 7 abc --outcome ", ["success", "failure"]),
    ("autonomy complete 7 abc --outcome f", ["failure"]),
    ("autonomy incident set ", ["ok", "warning", "critical"]),
    ("autonomy incident set w", ["warning"]),
    ("autonomy tasks --status ", ["todo", "in_progress", "done", "cancelled", "dead"]),
    ("autonomy tasks --kind ", ["work", "ops_remediation"]),
    ("autonomy token create --scope ", ["operator", "worker", "read"]),
])
@pytest.mark.slow
def test_fixed_values_complete_in_the_shell(words: str, expected: list[str]) -> None:
    """The shell offers exactly the values the server accepts (from the one definition
    it validates with); what is typed anyway is still refused by the operation."""
    env = {**os.environ, "_AUTONOMY_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    proc = subprocess.run([AUTONOMY], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected, (words, proc.stdout)


def test_a_value_outside_the_completions_is_refused_with_the_domains_code(
        runner: CliRunner, cli_env: dict[str, str]) -> None:
    """Completion offers; validation stays the operation's: ``invalid_outcome``, as the
    API answers, never click's usage error."""
    bad = runner.invoke(cli_app, ["complete", "7", "0" * 32, "--outcome", "meh", "--json"],
                        env=cli_env)
    assert "Usage:" not in bad.output
    assert json.loads(bad.output.splitlines()[0])["error"] == "invalid_outcome"
