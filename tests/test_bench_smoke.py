"""The benchmarks run: ``python -m bench --quick`` against the test servers produces, for
every benchmark, at least one row with a numeric figure, baseline and ratio -- and crashes
none. No timing is asserted (figures at quick sizes mean nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# 1-7, issue 22's command runner (13), issue 21's history and retention (14)
BENCHES = (*range(1, 8), 13, 14)
# issue 13's: fleets of worker processes and peer queues (pgqueuer, procrastinate, Celery);
# issue 22's HTTP workers (15: API processes and worker fleets)
FLEET_BENCHES = (8, 9, 10, 15)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module")
def quick_run(redis_server_url: str, pg_server_url: str,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``python -m bench --quick`` over every benchmark; its JSON document."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
    env.update(REDIS_URL=redis_server_url, TEST_DATABASE_URL=pg_server_url)
    only = ",".join(str(b) for b in BENCHES)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", only, "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert out.exists(), proc.stderr[-4000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    doc["returncode"], doc["stdout"], doc["stderr"] = proc.returncode, proc.stdout, proc.stderr
    return doc


def test_the_quick_run_crashes_no_benchmark_and_prints_one_table(
        quick_run: dict[str, Any]) -> None:
    assert quick_run["errors"] == {}, quick_run["errors"]
    assert quick_run["returncode"] == 0, quick_run["stderr"][-4000:]
    header = [ln for ln in quick_run["stdout"].splitlines() if ln.startswith("| bench ")]
    assert len(header) == 1
    assert quick_run["machine"]["postgresql"] and quick_run["machine"]["redis"]


@pytest.fixture(scope="module")
def fleet_run(redis_server_url: str, pg_server_url: str,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``python -m bench --quick --only 8,9,10``: the fleets, peers included."""
    out = tmp_path_factory.mktemp("bench") / "fleet.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTONOMY_")}
    env.update(REDIS_URL=redis_server_url, TEST_DATABASE_URL=pg_server_url)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only",
                           ",".join(str(b) for b in FLEET_BENCHES), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stderr[-4000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["errors"] == {}, doc["errors"]
    return doc


@pytest.mark.parametrize("bench", [*BENCHES, *FLEET_BENCHES])
def test_each_benchmark_reports_a_figure_beside_a_baseline(
        request: pytest.FixtureRequest, bench: int) -> None:
    run = request.getfixturevalue("fleet_run" if bench in FLEET_BENCHES else "quick_run")
    rows = [r for r in run["rows"] if r["bench"] == bench]
    assert rows, f"bench {bench} produced no row"
    for r in rows:
        for key in ("figure", "baseline", "ratio"):
            assert isinstance(r[key], int | float) and math.isfinite(r[key]), (key, r)
        assert r["figure"] > 0 and r["baseline"] > 0, r
        assert r["met"] in (True, False, None) and r["target"], r
        assert r["what"] and r["unit"] and r["baselineWhat"], r


def test_only_runs_the_benchmarks_asked_for(redis_server_url: str, pg_server_url: str,
                                            tmp_path: Path) -> None:
    out = tmp_path / "only.json"
    env = {**os.environ, "REDIS_URL": redis_server_url, "TEST_DATABASE_URL": pg_server_url}
    subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "6", "--json",
                    str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    assert {r["bench"] for r in json.loads(out.read_text())["rows"]} == {6}


def test_a_row_without_a_baseline_says_so_and_meets_no_ratio_target() -> None:
    """A peer that was not run leaves no baseline: the row says "no baseline" (it used to
    print "inf" as the ratio and count a ratio target as met), and a ratio target is not met."""
    from bench.common import Row
    from bench.report import cells

    row = Row(bench=9, what="pickup", figure=3.5, unit="ms", baseline=0.0,
              baseline_what="pgqueuer not run", target=">= 1.0")
    assert row.ratio is None and row.met is False
    assert "no baseline" in cells(row) and row.to_json()["ratio"] is None
    measured = Row(bench=9, what="pickup", figure=3.0, unit="ms", baseline=2.0,
                   baseline_what="pgqueuer", target="<= 2")
    assert measured.ratio == 1.5 and measured.met is True and "1.5×" in cells(measured)
