"""How Flower is started for this app: its command line, and when it may not bind."""

from __future__ import annotations

import sys

from app.netaddr import is_loopback


def flower_argv(*, address: str, port: int) -> list[str]:
    """The command line that runs Flower for ``app.celery_app``."""
    return [sys.executable, "-m", "celery", "-A", "app.celery_app", "flower",
            f"--address={address}", f"--port={port}"]


def refuse_open_flower(address: str, basic_auth: str | None) -> str | None:
    """Why Flower may not bind ``address`` (no basic auth and not loopback), or None."""
    if basic_auth or is_loopback(address):
        return None
    return (f"refusing to run Flower on {address} without basic auth: anyone who can reach "
            "it could revoke tasks and shut workers down. Set AUTONOMY_FLOWER_BASIC_AUTH "
            "(user:password) or bind a loopback address (127.0.0.1).")
