"""How the command runner starts CMD (issue 22): through a launcher that sets the
parent-death signal and execs CMD (``setpriv --pdeathsig KILL``), so ``subprocess`` keeps
its vfork path; the program is found first, so a missing or non-executable one fails the
task with ``OSError``'s words; without a launcher the ``preexec_fn`` path still works."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.workers import command
from app.workers.command import CommandRunner
from app.workers.job import Job, ValidationFailed


def _job() -> Job:
    return Job(task={"id": 7, "title": "t", "payload": {"k": 1}, "attempts": 0},
               lease_token="tok", lease_expires_at=None, lane="coder", worker="w1",
               stopping=threading.Event())


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As on a machine without a usable ``setpriv``."""
    monkeypatch.setattr(command, "_LAUNCHER", [None])
    yield


def test_this_machine_has_the_launcher_so_commands_start_on_the_vfork_path() -> None:
    launcher = command._launcher()
    assert launcher is not None and os.path.basename(launcher[0]) == "setpriv"
    assert launcher[1:] == ["--pdeathsig", "KILL", "--"]


def test_a_command_found_on_path_gets_its_stdin_and_its_own_process_group() -> None:
    script = 'import json, os, sys; print(json.dumps({"id": json.load(sys.stdin)["id"], ' \
             '"group": os.getpgid(0) == os.getpid(), "sid": os.getsid(0) == os.getpid()}))'
    out = CommandRunner(["python3", "-c", script]).handle_job(_job())
    assert out == {"id": 7, "group": True, "sid": True}


def test_the_command_keeps_its_argv0_as_written() -> None:
    """``sh`` names itself by ``$0`` in its error lines, which become failure reasons."""
    out = CommandRunner(["sh", "-c", 'echo "$0"']).handle_job(_job())
    assert out == {"stdout": "sh\n"}
    with pytest.raises(ValidationFailed) as e:
        CommandRunner(["sh", "-c", "no-such-program-h7"]).handle_job(_job())
    assert e.value.reason.startswith("sh: ") and "no-such-program-h7" in e.value.reason


def test_a_relative_command_runs_from_the_runners_cwd(tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho \"hello from $(pwd)\"\n")
    script.chmod(0o755)
    out = CommandRunner(["./hello.sh"], cwd=str(tmp_path)).handle_job(_job())
    assert out == {"stdout": f"hello from {tmp_path}\n"}


def test_a_program_not_on_path_fails_with_no_such_file() -> None:
    with pytest.raises(ValidationFailed) as e:
        CommandRunner(["no-such-program-h7"]).handle_job(_job())
    assert e.value.reason == "cannot run no-such-program-h7: No such file or directory"


def test_a_file_that_is_not_executable_fails_with_permission_denied(tmp_path: Path) -> None:
    script = tmp_path / "plain.sh"
    script.write_text("echo hi\n")
    script.chmod(0o644)
    with pytest.raises(ValidationFailed) as e:
        CommandRunner([str(script)]).handle_job(_job())
    assert e.value.reason == f"cannot run {script}: Permission denied"


def test_without_a_launcher_the_preexec_path_runs_the_command_alike(
        no_launcher: None) -> None:
    assert command._launcher() is None
    out = CommandRunner(["sh", "-c", 'cat; echo " $AUTONOMY_TASK_ID"']).handle_job(_job())
    assert out["stdout"].endswith(" 7\n") and '"id": 7' in out["stdout"]
    with pytest.raises(ValidationFailed) as e:
        CommandRunner(["no-such-program-h7"]).handle_job(_job())
    assert e.value.reason == "cannot run no-such-program-h7: No such file or directory"


def test_a_program_removed_after_it_ran_fails_its_next_task_with_the_launchers_reason(
        tmp_path: Path) -> None:
    script = tmp_path / "once.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    runner = CommandRunner([str(script)])
    assert runner.handle_job(_job()) == {"stdout": "ran\n"}
    script.unlink()
    with pytest.raises(ValidationFailed) as e:
        runner.handle_job(_job())
    assert str(script) in e.value.reason and "No such file or directory" in e.value.reason
