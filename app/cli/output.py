"""CLI output: JSON for scripts (``--json`` or a pipe), readable tables for people, and
exit codes (0 on ``ok``, 1 on a refusal, 2 on bad input, 3 on an unreachable service).

Tables are for people: a column named ``...Ms`` shows a duration (``850 ms``, ``12.5 s``,
``4 min 5 s``, ``3 h 12 min``, ``2 d 4 h``) and a column named ``...At`` holding an ISO
time shows it in UTC to the second with how long ago (or how far ahead) it is. JSON output
is the answer as it is: milliseconds and ISO times.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import typer

from app.clock import utcnow
from app.errors import AutonomyError, InvalidInput, Unavailable


def want_json(flag: bool | None) -> bool:
    """JSON when asked, or when stdout is not a terminal."""
    return bool(flag) or not sys.stdout.isatty()


def exit_code(err: AutonomyError) -> int:
    if isinstance(err, InvalidInput):
        return 2
    if isinstance(err, Unavailable):
        return 3
    return 1


def fail(err: AutonomyError, as_json: bool) -> None:
    """Print an error (code + message on stderr; the JSON answer on stdout for scripts)."""
    if as_json:
        typer.echo(json.dumps(err.to_wire(), default=str))
    typer.echo(printable(f"error: {err.code}: {err.message}"), err=True)
    raise typer.Exit(exit_code(err))


def printable(text: str) -> str:
    """``text`` with anything that cannot be encoded as UTF-8 (a lone surrogate from a
    non-UTF-8 argument) escaped, so printing it cannot fail."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def human_duration(ms: Any) -> str:
    """``850 ms``, ``12.5 s``, ``4 min 5 s``, ``3 h 12 min``, ``2 d 4 h``; anything that is
    not a number is shown as it is (``-`` for None)."""
    if isinstance(ms, bool) or not isinstance(ms, int | float):
        return _cell(ms)
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    if ms < 1000:
        return f"{sign}{ms:.0f} ms"
    if round(ms / 1000, 1) < 10:
        return f"{sign}{ms / 1000:.1f} s"
    s = round(ms / 1000)
    if s < 60:
        return f"{sign}{s} s"
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                      ("min", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{sign}{s // size} {unit}" + (f" {rest} {sub}" if rest else "")
    raise AssertionError("unreachable: s >= 60")


def human_time(iso: Any, now: datetime | None = None) -> str:
    """An ISO time as ``2026-11-29 23:44:21Z (3 min ago)`` (``in 5 min`` when ahead);
    anything that is not an ISO time is shown as it is."""
    if not isinstance(iso, str):
        return _cell(iso)
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    delta_ms = ((now or utcnow()) - t).total_seconds() * 1000
    if abs(delta_ms) < 1000:
        rel = "now"
    elif delta_ms > 0:
        rel = f"{human_duration(_round(delta_ms))} ago"
    else:
        rel = f"in {human_duration(_round(-delta_ms))}"
    return f"{t.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z ({rel})"


def _round(ms: float) -> float:
    # "3 min ago", never "2 min 59 s ago" for 179.6 s
    return round(ms / 1000) * 1000


# a wire name that reads wrong as a heading: ``attempts`` counts failures so far
_HEADERS = {"attempts": "FAILURES"}


def _header(column: str) -> str:
    if column in _HEADERS:
        return _HEADERS[column]
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", column).split()
    if len(words) > 1 and words[-1] == "Ms":
        words.pop()
    return " ".join(words).upper()


def _format(column: str, v: Any, now: datetime) -> str:
    if column.endswith("Ms"):
        return human_duration(v)
    if column == "at" or column.endswith("At"):
        return human_time(v, now)
    return _cell(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
          now: datetime | None = None) -> str:
    """A plain aligned text table, durations and times made readable."""
    at = now or utcnow()
    heads = [_header(c) for c in columns]
    cells = [[_format(c, r.get(c), at) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return str(v)


def emit(answer: dict[str, Any], as_json: bool,
         human: Callable[[dict[str, Any]], str] | None = None) -> None:
    """Print an ``ok`` answer as JSON or as ``human(answer)``."""
    if as_json or human is None:
        typer.echo(json.dumps(answer, indent=None if as_json else 2, default=str))
    else:
        typer.echo(printable(human(answer)))


def run(fn: Callable[[], dict[str, Any]], as_json: bool,
        human: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """Call an operation, print its answer, map refusals to exit codes."""
    try:
        answer = fn()
    except AutonomyError as e:
        fail(e, as_json)
        raise  # unreachable: fail() exits
    emit(answer, as_json, human)
    return answer
