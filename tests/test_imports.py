"""Every module imports: the quick loop (``make test-fast``) leaves out the slow tests, not
any module -- a module that no fast test reaches still fails here when it cannot load."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import app
import tasks

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> list[str]:
    names = ["beat_schedule", "app", "tasks"]
    for pkg in (app, tasks):
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}."):
            # __main__ runs the CLI; the Alembic scripts run only inside Alembic's context
            if info.name.endswith(".__main__") or info.name.startswith("app.storage.migrations"):
                continue
            names.append(info.name)
    return sorted(names)


def test_the_module_list_covers_every_python_file() -> None:
    files = {p for p in (ROOT / "app").rglob("*.py")
             if "storage/migrations" not in p.as_posix() and p.name != "__main__.py"}
    assert len([m for m in _modules() if m.split(".")[0] == "app"]) == len(files)


@pytest.mark.parametrize("module", _modules())
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)
