"""CLI output: JSON for scripts (``--json`` or a pipe), readable tables for people, and
exit codes (0 on ``ok``, 1 on a refusal, 2 on bad input, 3 on an unreachable service)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer

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


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
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
