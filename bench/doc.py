"""``python -m bench.doc [results.json] [docs/benchmarks.md]``: put a run's table, machine
and query plans into the doc, between its ``<!-- generated:NAME -->`` markers (the prose
around them is written by hand and left alone)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.common import Row
from bench.report import RESULTS, table

ROOT = Path(__file__).resolve().parent.parent


def results_table(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["rows"]:
        row = Row(bench=r["bench"], what=r["what"], figure=r["figure"], unit=r["unit"],
                  baseline=r["baseline"], baseline_what=r["baselineWhat"], target="report")
        rows.append((row, r))
    text = table([row for row, _ in rows])
    # replace the target and met? columns with the run's own judgement
    lines = text.splitlines()
    out = lines[:2]
    for line, (_, r) in zip(lines[2:], rows, strict=True):
        cells = line.split(" | ")
        cells[-2] = r["target"]
        cells[-1] = {True: "yes", False: "NO", None: "-"}[r["met"]] + " |"
        out.append(" | ".join(cells))
    return "\n".join(out)


def machine(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    secs = ", ".join(f"{k}: {v} s" for k, v in m.get("seconds", {}).items())
    return "\n".join([
        "```", *m["lscpu"], "", f"uname -a: {m['uname']}",
        f"Python {m['python']}, Redis {m['redis']}, PostgreSQL {m['postgresql']}, "
        f"SQLite {m['sqlite']}", f"run at {doc['at']} (quick={m['quick']}); "
        f"seconds per benchmark: {secs}",
        f"load average at start {m.get('loadavgAtStart')}, at end {m.get('loadavgAtEnd')} "
        "(the machine is shared with other work; figures move with its load)", "```"])


def plans(doc: dict[str, Any]) -> str:
    parts = []
    seen: set[str] = set()
    for r in doc["rows"]:
        p = r.get("details", {}).get("plans")
        if not p or "PostgreSQL" not in r["what"]:
            continue
        for size in ("big", "small"):
            for item in p.get(size, []):
                key = f"{size}:{item['sql']}"
                if key in seen:
                    continue
                seen.add(key)
                label = "large" if size == "big" else "small"
                parts.append(f"#### bench {r['bench']}, {label} size — "
                             f"{r['what'].split(' at ')[0]}\n\n```sql\n{item['sql'].strip()}\n"
                             f"```\n\n```\n{item['plan']}\n```\n")
    return "\n".join(parts)


def details(doc: dict[str, Any]) -> str:
    lines = []
    for r in doc["rows"]:
        d = dict(r.get("details", {}))
        d.pop("plans", None)
        if d:
            lines.append(f"- bench {r['bench']} — {r['what']}: `{json.dumps(d, default=str)}`")
    return "\n".join(lines)


def fill(md: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
    if not pat.search(md):
        raise SystemExit(f"docs: no <!-- generated:{name} --> section")
    return pat.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), md)


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else RESULTS / "latest.json"
    dst = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "benchmarks.md"
    doc = json.loads(src.read_text())
    md = dst.read_text()
    for name, body in (("table", results_table(doc)), ("machine", machine(doc)),
                       ("details", details(doc)), ("plans", plans(doc))):
        md = fill(md, name, body)
    dst.write_text(md)
    print(f"updated {dst} from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
