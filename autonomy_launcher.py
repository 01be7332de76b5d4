"""The ``autonomy`` console script: makes sure ``app`` is this distribution's package before
importing it, then runs ``app.cli.main``.

autonomy is an application with generic top-level names (``app``, ``tasks``,
``beat_schedule``), installed into an environment or image of its own. Installed beside a
project with its own ``app`` package, one of them shadows (or overwrites) the other and the
CLI would die with an ``ImportError`` deep inside; this says what is wrong instead, and
exits 2. Worker code that talks to a server needs only the ``autonomy-client`` SDK
(``sdk/python``), which has no such names.

It imports nothing but the standard library until the check has passed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "autonomy"
EXIT_CONFLICT = 2


def foreign_app() -> str | None:
    """Where the importable ``app`` comes from when it is not this distribution's own
    (another package's, or ours with its ``__init__`` overwritten by one); None when it
    is ours."""
    spec = importlib.util.find_spec("app")
    if spec is None or spec.origin is None:
        return "nowhere (no importable 'app' package)"
    origin = Path(spec.origin).resolve()
    here = Path(__file__).resolve().parent
    try:
        files = metadata.distribution(DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:  # run from a source tree, not installed
        files = []
    entry = next((f for f in files if f.as_posix() == "app/__init__.py"), None)
    if entry is None:  # an editable install or a source tree: our app is beside this file
        return None if origin == here / "app" / "__init__.py" else str(origin)
    if origin != Path(str(entry.locate())).resolve():
        return str(origin)
    if entry.hash is not None and entry.hash.mode == "sha256":
        digest = base64.urlsafe_b64encode(hashlib.sha256(origin.read_bytes()).digest())
        if digest.rstrip(b"=").decode() != entry.hash.value:  # overwritten by another wheel
            return str(origin)
    return None


def main() -> None:
    """Refuse (exit 2) when another installed package provides ``app``; else run the CLI."""
    other = foreign_app()
    if other is not None:
        print(f"autonomy: another installed package provides a top-level 'app' ({other}), "
              "which hides autonomy's own; install autonomy into its own virtual environment "
              "(python -m venv) or use its image. Workers that only talk to a server can use "
              "the autonomy-client SDK (sdk/python), which installs beside any project.",
              file=sys.stderr)
        sys.exit(EXIT_CONFLICT)
    from app.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
