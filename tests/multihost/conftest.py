"""The fleet fixture (five namespace hosts, see ``fleet.py``) and the partition table.

Needs root and ``ip netns``: skipped without them locally, a failure in CI (``CI`` set).
Everything the fixture creates -- namespaces, links, processes, temp files -- is removed
even when a test fails; a session killed outright leaves namespaces that the next session
sweeps (``netns.sweep_orphans``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.multihost import netns
from tests.multihost.fleet import REPO, Fleet, make_tmp

TABLE_PATH = REPO / "test-output" / "multihost-table.md"
COLUMNS = ("fault", "done", "lost", "double grants", "late completes refused",
           "beat handover s")
ROWS: list[dict[str, Any]] = []


def table() -> str:
    """The partition table as Markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in ROWS:
        lines.append("| " + " | ".join(str(row.get(c, "-")) for c in COLUMNS) + " |")
    return "\n".join(lines)


def add_row(row: dict[str, Any]) -> None:
    """Record one fault's row; the table file is rewritten after every row."""
    ROWS.append(row)
    TABLE_PATH.parent.mkdir(exist_ok=True)
    notes = [f"- {r['fault']}: {r['notes']}" for r in ROWS if r.get("notes")]
    TABLE_PATH.write_text(table() + "\n\n" + "\n".join(notes) + "\n")
    print("\n" + table())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if ROWS:
        terminalreporter.write_sep("=", "multihost partition table")
        terminalreporter.write_line(table())
        for r in ROWS:
            if r.get("notes"):
                terminalreporter.write_line(f"- {r['fault']}: {r['notes']}")


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    why = netns.available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"multihost tests cannot run: {why}")
        pytest.skip(why)
    if shutil.which("setpriv") is None:
        msg = "multihost tests need setpriv (util-linux) to run PostgreSQL as non-root"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    netns.sweep_orphans()
    tmp = make_tmp()
    net = netns.Network()
    f = Fleet(net, tmp)
    try:
        with netns.entered(net.server.ns):
            for role in ("wd", "wh", "b1", "b2"):
                net.add_host(role)
            f.start_servers()
            f.start_api()
            f.api("configure_lane", assignee="mh", maxInFlight=2, actor="multihost")
            f.start_celery_worker()
            f.start_lane_worker(net.hosts["wd"], over_http=False)
            f.start_lane_worker(net.hosts["wh"], over_http=True)
            f.start_beat(net.hosts["b1"])
            f.start_beat(net.hosts["b2"])
            yield f
    finally:
        with contextlib.suppress(Exception):
            f.stop()
        net.destroy()
        keep = os.environ.get("MULTIHOST_KEEP_LOGS")
        if keep:
            shutil.copytree(tmp, Path(keep), dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
