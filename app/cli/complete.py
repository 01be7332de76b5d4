"""Shell completion of the CLI's fixed values (``check NAME``, ``--outcome``, ``incident
set STATUS``, ``tasks --status/--kind``, ``token create --scope``): each from the one
definition the server validates with, so the shell offers exactly what is accepted.

Completion only offers: a value typed anyway is still checked by the operation, and
refused with the same code as over HTTP (``invalid_outcome``, ...) -- not by click.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def one_of(values: Iterable[str]) -> Callable[[str], list[str]]:
    """A typer ``autocompletion`` offering the ``values`` that start with what was typed."""
    fixed = tuple(values)

    def complete(incomplete: str) -> list[str]:
        return [v for v in fixed if v.startswith(incomplete)]

    return complete
