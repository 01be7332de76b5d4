"""The settings reference, generated from ``app.settings.Settings``: ``docs/settings.md``.

``python -m app.settings_doc`` writes it; ``python -m app.settings_doc --check`` exits 1
when the file is out of date or a setting has no description (``tests/test_settings_doc.py``
runs the same check). Each row: the field, its environment variable(s), its default, its
unit (from the name's suffix: ``_s``, ``_ms``, ``_h``, ``_bytes``, ``_len``) and its
description -- the string under the field in ``app/settings.py``.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from app.settings import Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
UNITS = {"_s": "seconds", "_ms": "milliseconds", "_h": "hours", "_bytes": "bytes",
         "_len": "characters", "_factor": "x the job's period"}
_SECTION = re.compile(r"^\s*# --- (.+?) -*$")
_FIELD = re.compile(r"^    (\w+): ")


class Undocumented(ValueError):
    """Raised when a setting has no description."""


def env_vars(name: str, field: FieldInfo, prefix: str = "AUTONOMY_") -> list[str]:
    """The environment variables a field is read from."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(a) for a in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{prefix}{name.upper()}"]


def unit(name: str) -> str:
    """The unit the field's name carries, or ``""``."""
    return next((u for suffix, u in UNITS.items() if name.endswith(suffix)), "")


def default(field: FieldInfo) -> str:
    """The default as it would be written in the environment (``unset`` for None)."""
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if str(value) else '""'


def sections(cls: type[Settings]) -> dict[str, str]:
    """Field name -> the ``# --- section ---`` comment above it in the class's source
    (fields of a subclass without one: "other")."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, Settings)):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        current = "other"
        for line in source.splitlines():
            m = _SECTION.match(line)
            if m and not m.group(1).startswith("end of"):
                current = m.group(1).split(" (")[0].strip()
                continue
            f = _FIELD.match(line)
            if f and f.group(1) in cls.model_fields:
                out[f.group(1)] = current
    return out


def undocumented(cls: type[Settings] = Settings) -> list[str]:
    """The fields without a description."""
    return [n for n, f in cls.model_fields.items() if not (f.description or "").strip()]


def render(cls: type[Settings] = Settings) -> str:
    """The reference as Markdown; raises ``Undocumented`` naming each field that lacks a
    description."""
    missing = undocumented(cls)
    if missing:
        raise Undocumented(f"settings without a description: {', '.join(missing)} "
                           "(add a docstring under the field in app/settings.py)")
    where = sections(cls)
    lines = ["# Settings reference", "",
             "Generated from `app/settings.py` by `python -m app.settings_doc`; do not edit "
             "by hand (`tests/test_settings_doc.py` fails when this file is out of date).",
             "Every setting is read once, from the environment, at start-up; a bad value "
             "stops the process with the setting's name.", ""]
    current = None
    for name, field in cls.model_fields.items():
        section = where.get(name, "other")
        if section != current:
            current = section
            lines += [f"## {section[:1].upper()}{section[1:]}", "",
                      "| setting | environment | default | unit | meaning |",
                      "|---|---|---|---|---|"]
        env = ", ".join(f"`{v}`" for v in env_vars(name, field))
        desc = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {env} | `{default(field)}` | {unit(name)} | {desc} |")
        nxt = list(cls.model_fields)
        i = nxt.index(name)
        if i + 1 == len(nxt) or where.get(nxt[i + 1], "other") != section:
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/settings.md``, or with ``--check`` exit 1 when it is out of date."""
    args = sys.argv[1:] if argv is None else argv
    try:
        text = render()
    except Undocumented as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "--check" in args:
        if not DOC.exists() or DOC.read_text(encoding="utf-8") != text:
            print(f"error: {DOC} is out of date: run python -m app.settings_doc",
                  file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
