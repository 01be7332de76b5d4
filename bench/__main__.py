"""``python -m bench [--quick] [--only N,M] [--json PATH]``: run the benchmarks against real
Redis and PostgreSQL (and a SQLite temp file), print one table, write it as JSON.

Servers: ``REDIS_URL`` (else ``TEST_REDIS_URL``, else redis://127.0.0.1:6379/0) and
``TEST_DATABASE_URL`` (else postgresql://postgres@127.0.0.1:5432/postgres), where each run
creates and later drops databases of its own. Exit status 0 when every benchmark ran
(missed targets are reported in the table, not as a failure); 1 when one crashed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import Row, environment
from bench.report import table, write_json

BENCHES = {
    1: "bench.b1_run_lock",
    2: "bench.b2_collect_locks",
    3: "bench.b3_claim_complete",
    4: "bench.b4_race",
    5: "bench.b5_checks_scale",
    6: "bench.b6_fingerprint_count",
    7: "bench.b7_http",
    8: "bench.b8_drain",
    9: "bench.b9_pickup",
    10: "bench.b10_round_trips",
    12: "bench.b12_script_runner",
    13: "bench.b13_command_runner",
    14: "bench.b14_history",
    15: "bench.b15_http_workers",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    p.add_argument("--only", default="", help="comma-separated benchmark numbers, e.g. 3,4")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON (default bench/results/latest.json)")
    args = p.parse_args(argv)
    if args.only:
        try:
            args.numbers = sorted({int(x) for x in args.only.split(",") if x.strip()})
        except ValueError:
            p.error("--only takes numbers, e.g. --only 3,4")
        unknown = [n for n in args.numbers if n not in BENCHES]
        if unknown:
            p.error(f"no benchmark {unknown}; known: {sorted(BENCHES)}")
    else:
        args.numbers = sorted(BENCHES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rows: list[Row] = []
    errors: dict[str, str] = {}
    info: dict[str, object] = {"quick": args.quick, "seconds": {},
                               "loadavgAtStart": os.getloadavg()}
    with environment(quick=args.quick) as env:
        info.update(server_versions(env))
        for n in args.numbers:
            module = BENCHES[n]
            t0 = time.perf_counter()
            print(f"[bench {n}] {module} ...", file=sys.stderr, flush=True)
            try:
                got = importlib.import_module(module).run(env)
                rows.extend(got)
                for r in got:
                    print(f"[bench {n}]   {r.what}: {r.figure:.4g} {r.unit} vs "
                          f"{r.baseline:.4g} ({r.baseline_what}) -> {r.ratio_text(3)} "
                          f"met={r.met}", file=sys.stderr, flush=True)
            except Exception as e:  # one crashed benchmark must not hide the others' figures
                errors[str(n)] = "".join(traceback.format_exception(e))
                print(f"[bench {n}] FAILED: {e!r}", file=sys.stderr, flush=True)
            info["seconds"][str(n)] = round(time.perf_counter() - t0, 1)  # type: ignore[index]
    info["loadavgAtEnd"] = os.getloadavg()
    print(table(rows))
    for n, err in errors.items():
        print(f"\nbench {n} crashed:\n{err}", file=sys.stderr)
    path = write_json(rows, info=info, errors=errors, path=args.json)
    print(f"\nwritten: {path}", file=sys.stderr)
    return 1 if errors else 0


def server_versions(env: object) -> dict[str, str]:
    from bench.common import Env

    assert isinstance(env, Env)
    client = env.redis()
    redis_v = str(client.info("server").get("redis_version"))
    client.close()
    with env._admin.connect() as c:
        pg_v = str(c.exec_driver_sql("SHOW server_version").scalar())
    import sqlite3

    return {"redis": redis_v, "postgresql": pg_v, "sqlite": sqlite3.sqlite_version}


if __name__ == "__main__":
    sys.exit(main())
