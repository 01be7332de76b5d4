"""The CLI for people: ``--version``, shell completion, and tables with readable durations
and times (while JSON keeps milliseconds and ISO times)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

import app
from app.cli.output import human_duration, human_time, table
from app.settings import Settings
from app.storage import locks
from app.storage.context import Context
from tests.test_cli import cli, cli_env, ok

__all__ = ["cli_env"]

AUTONOMY = str(Path(sys.executable).with_name("autonomy"))  # the installed console script


def _script(env: dict[str, str] | None, *args: str, shell: str = "bash"
            ) -> subprocess.CompletedProcess[str]:
    """Run the console script from a shell (completion detects the shell it runs in)."""
    # "; exit $?": bash -c would exec a lone command in its own place, and completion
    # would find whatever started the tests instead (sh, under make: "not supported")
    line = " ".join([AUTONOMY, *args]) + "; exit $?"
    return subprocess.run([shell, "-c", line], env=env, capture_output=True, text=True,
                          timeout=60)


def on_a_terminal(env: dict[str, str], *args: str) -> str:
    """Run ``autonomy ARGS`` with its stdout on a pseudo-terminal; answer what it printed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, stdout=slave,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.mark.slow
def test_version_prints_the_package_version() -> None:
    proc = subprocess.run([AUTONOMY, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"autonomy {app.__version__}"
    assert app.__version__ == importlib.metadata.version("autonomy")


@pytest.mark.slow
def test_show_completion_prints_the_bash_script() -> None:
    proc = _script(None, "--show-completion")
    assert proc.returncode == 0, proc.stderr
    assert "_AUTONOMY_COMPLETE=complete_bash" in proc.stdout
    assert "complete -o default -F _autonomy_completion autonomy" in proc.stdout


@pytest.mark.slow
def test_completion_completes_commands_and_subcommands() -> None:
    env = {**os.environ, "_AUTONOMY_COMPLETE": "complete_bash"}
    for words, cword, expected in (("autonomy ch", "1", {"check"}),
                                   ("autonomy incident ", "2", {"set"}),
                                   ("autonomy wor", "1", {"worker"})):
        proc = subprocess.run([AUTONOMY], env={**env, "COMP_WORDS": words, "COMP_CWORD": cword},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert set(proc.stdout.split()) == expected, (words, proc.stdout)


@pytest.mark.slow
def test_install_completion_writes_the_shell_configuration(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = _script(env, "--install-completion")
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / ".bash_completions" / "autonomy.sh"
    assert "_AUTONOMY_COMPLETE" in script.read_text()
    assert str(script.relative_to(tmp_path)) in (tmp_path / ".bashrc").read_text()


@pytest.mark.parametrize(("ms", "text"), [
    (0, "0 ms"), (850, "850 ms"), (1_234, "1.2 s"), (9_960, "10 s"), (12_400, "12 s"),
    (59_999, "1 min"), (245_000, "4 min 5 s"), (3_600_000, "1 h"), (11_520_000, "3 h 12 min"),
    (187_200_000, "2 d 4 h"), (-1_500, "-1.5 s"), (None, "-"), ("n/a", "n/a"),
])
def test_durations_read_as_people_say_them(ms: object, text: str) -> None:
    assert human_duration(ms) == text


def test_times_read_in_utc_with_how_long_ago() -> None:
    now = datetime(2026, 11, 29, 23, 44, 21, tzinfo=UTC)
    assert human_time("2026-11-29T23:41:21.400Z", now) == "2026-11-29 23:41:21Z (3 min ago)"
    assert human_time("2026-11-30T00:49:21+00:00", now) == "2026-11-30 00:49:21Z (in 1 h 5 min)"
    assert human_time("2026-11-29T23:44:21.300Z", now) == "2026-11-29 23:44:21Z (now)"
    assert human_time("not a time", now) == "not a time"
    assert human_time(None, now) == "-"


def test_tables_show_durations_and_times_and_name_columns_in_words() -> None:
    now = datetime(2026, 11, 29, 23, 44, 21, tzinfo=UTC)
    rows = [{"job": "readiness", "startedAt": "2026-11-29T23:41:21Z", "elapsedMs": 180_000,
             "budgetMs": 30_000, "overBudget": True}]
    lines = table(rows, ["job", "startedAt", "elapsedMs", "budgetMs", "overBudget"],
                  now=now).splitlines()
    assert lines[0].split("  ")[0] == "JOB"
    assert "STARTED AT" in lines[0] and "ELAPSED" in lines[0] and "OVER BUDGET" in lines[0]
    assert "MS" not in lines[0]
    assert lines[1].split() == ["readiness", "2026-11-29", "23:41:21Z", "(3", "min", "ago)",
                                "3", "min", "30", "s", "yes"]


@pytest.mark.slow
def test_locks_on_a_terminal_are_readable_and_json_is_unchanged(cli_env: dict[str, str]
                                                                ) -> None:
    assert cli(cli_env, "db", "upgrade").returncode == 0
    ctx = Context.from_settings(Settings(database_url=cli_env["DATABASE_URL"],
                                         redis_url=cli_env["REDIS_URL"],
                                         redis_prefix=cli_env["AUTONOMY_REDIS_PREFIX"]))
    try:
        assert locks.acquire(ctx, "readiness", budget_ms=90_000, holder="elsewhere:7:t")
        human = on_a_terminal(cli_env, "locks")
        head, row = human.splitlines()[:2]
        assert "BUDGET" in head and "ELAPSED" in head and "MS" not in head
        # started under a second ago reads "(now)", else "(N s ago)": both are readable times
        assert "1 min 30 s" in row and "90000" not in row
        assert "ago)" in row or "(now)" in row
        listed = ok(cli_env, "locks")  # piped: JSON, as it was
        assert listed["runLocks"][0]["budgetMs"] == 90_000
        assert isinstance(listed["runLocks"][0]["elapsedMs"], int)
        assert listed["runLocks"][0]["startedAt"].endswith("Z")
        checked = on_a_terminal(cli_env, "check", "status")
        assert checked.startswith("status: ok in ") and checked.strip().split()[-1] in (
            "ms", "s", "min")
        assert "durationMs" in json.loads(cli(cli_env, "check", "status").stdout)
    finally:
        ctx.close()
