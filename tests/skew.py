"""A process whose clock is off, for the one-clock tests (SPEC 4.9).

libfaketime breaks Python 3.11's ``time.sleep`` here, so a process's clock is shifted
from inside it instead: ``shifted_env`` writes a ``sitecustomize.py`` into a directory of
the test's own and puts it first on ``PYTHONPATH``; Python imports it at start-up, and
with ``AUTONOMY_TEST_CLOCK_OFFSET_S`` set it moves ``time.time`` and ``time.time_ns`` by
that many seconds -- the wall clock every ``datetime`` the product makes is read from
(``app.clock.utcnow``), and what logging stamps. ``time.monotonic`` is left alone (a
host whose wall clock is wrong still measures intervals right), and so is everything a
database server reads: SQLite's ``'now'`` goes to the C library, not to ``time.time``.
Nothing of this is in the product.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFSET_ENV = "AUTONOMY_TEST_CLOCK_OFFSET_S"

SITECUSTOMIZE = '''\
"""Test only (tests/skew.py): shift this process's wall clock by $AUTONOMY_TEST_CLOCK_OFFSET_S."""
import os
import time

_offset = float(os.environ.get("AUTONOMY_TEST_CLOCK_OFFSET_S") or 0)
if _offset:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _offset
    time.time_ns = lambda: _time_ns() + int(_offset * 1_000_000_000)
'''


def shifted_env(env: dict[str, str], offset_s: float, where: Path) -> dict[str, str]:
    """``env`` for a child process whose wall clock reads ``offset_s`` seconds off
    (``where``: a directory of the test's own that receives the ``sitecustomize.py``)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    path = os.pathsep.join(p for p in (str(where), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, OFFSET_ENV: str(offset_s)}
