"""The one results table (printed) and its JSON twin (``bench/results/latest.json``)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Row

RESULTS = Path(__file__).parent / "results"
HEADERS = ("bench", "what", "figure", "baseline", "ratio", "target", "met?")


def _num(x: float) -> str:
    if x != x:  # NaN
        return "nan"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def cells(row: Row) -> tuple[str, ...]:
    met = {True: "yes", False: "NO", None: "-"}[row.met]
    return (str(row.bench), row.what, f"{_num(row.figure)} {row.unit}",
            f"{_num(row.baseline)} {row.unit} ({row.baseline_what})", row.ratio_text(),
            row.target_text(), met)


def table(rows: list[Row]) -> str:
    """A Markdown table (reads as plain text in a terminal too)."""
    body = [HEADERS, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADERS))]

    def fmt(line: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(body[0]), sep, *(fmt(b) for b in body[1:])])


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(env_info: dict[str, Any]) -> dict[str, Any]:
    lscpu = _cmd(["lscpu"]).splitlines()[:10]
    return {"uname": _cmd(["uname", "-a"]) or " ".join(platform.uname()), "lscpu": lscpu,
            "python": sys.version.split()[0], **env_info}


def write_json(rows: list[Row], *, info: dict[str, Any], errors: dict[str, str],
               path: Path | None = None) -> Path:
    path = path or RESULTS / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"at": datetime.now(UTC).isoformat(), "machine": machine(info),
           "rows": [r.to_json() for r in rows], "errors": errors}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
