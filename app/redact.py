"""Secrets taken out of text before it is stored (SPEC 4.10): a failure reason is a
worker's last stderr line, and a result is whatever the worker printed -- either can
carry a password, a token or a key.

``redact(text)`` answers the text with each secret replaced by ``[REDACTED]`` and how
many were replaced; ``redact_json(value)`` does it to every string (and key-value pair
with a secret-looking key) in a JSON value. The shapes: ``password=``/``token=``/
``secret=``/``api_key=`` values (also ``:`` and JSON-quoted forms), ``Authorization:
Bearer ...`` and bare ``Bearer ...``, URLs with ``user:password@``, AWS access key ids
(``AKIA...``/``ASIA...``) and ``aws_secret_access_key``, Google API keys (``AIza...``),
GitHub and Slack tokens, JWTs, and PEM private-key blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

MARK = "[REDACTED]"

_KEYS = (r"pass(?:word|wd)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|"
         r"client[_-]?secret|credentials?|aws_secret_access_key|private[_-]?key")
_NOT_DONE = r"(?!\[REDACTED\])"  # a value already redacted by an earlier shape


def _authorization(m: re.Match[str]) -> str:
    scheme = f"{m.group(2)} " if m.group(2) else ""
    return f"{m.group(1)}{scheme}{MARK}"


_PATTERNS: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # PEM private key blocks (whole block, or to the end of a text that cut it off)
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE "
                r"KEY-----|\Z)", re.S), MARK),
    # scheme://user:password@host: the user stays, the password goes
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@"), r"\1" + MARK + "@"),
    # Authorization: Bearer xyz (or Basic, or a bare value)
    (re.compile(r"(?i)\b(authorization\s*[:=]\s*)(?:(bearer|basic|token)\s+)?"
                + _NOT_DONE + r"[^\s,;\"']+"), _authorization),
    # a bare "Bearer xyz"
    (re.compile(r"(?i)\b(bearer)\s+" + _NOT_DONE + r"[A-Za-z0-9._~+/=-]{8,}"),
     r"\1 " + MARK),
    # key=value, key: value, "key": "value" (db_password=, X-Api-Key: ...)
    (re.compile(rf"(?i)([\"']?[\w.-]*(?:{_KEYS})[\"']?\s*[:=]\s*){_NOT_DONE}"
                r"(\"[^\"]*\"|'[^']*'|[^\s,;&\"']+)"), r"\1" + MARK),
    # cloud and service keys by their shape
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"), MARK),  # AWS key id
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), MARK),  # Google API key
    (re.compile(r"\bya29\.[0-9A-Za-z_-]{20,}"), MARK),  # Google OAuth access token
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"), MARK),  # GitHub
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), MARK),  # Slack
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), MARK),  # JWT
]


def redact(text: str) -> tuple[str, int]:
    """``text`` with every secret shape replaced by ``[REDACTED]``, and how many were."""
    total = 0
    for pattern, repl in _PATTERNS:
        text, n = pattern.subn(repl, text)
        total += n
    return text, total


_SECRET_KEY = re.compile(rf"(?i)^(?:{_KEYS})$")


def redact_json(value: Any) -> tuple[Any, int]:
    """``value`` (JSON) with secrets redacted in every string, and every value under a
    secret-looking key replaced whole; and how many were."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        out, total = [], 0
        for v in value:
            r, n = redact_json(v)
            out.append(r)
            total += n
        return out, total
    if isinstance(value, dict):
        res: dict[str, Any] = {}
        total = 0
        for k, v in value.items():
            if isinstance(k, str) and _SECRET_KEY.match(k) and isinstance(v, str | int) \
                    and v != MARK:
                res[k] = MARK
                total += 1
                continue
            r, n = redact_json(v)
            res[k] = r
            total += n
        return res, total
    return value, 0
