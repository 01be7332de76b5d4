"""Fresh virtual environments for packaging tests, without a network.

A package is built into a wheel with the test environment's own ``build`` and setuptools
(``--no-isolation``); its runtime dependencies are copied into the fresh environment from
the test environment, file by file as their RECORDs list them, so that pip finds them
installed; then pip installs the wheel with ``--no-index`` (it fails if a dependency the
wheel declares is not among those copied). Only declared runtime dependencies are copied,
so an undeclared import fails in the fresh environment as it would for a user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; fail the test with its output when it fails."""
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def build(src: Path, out: Path) -> Path:
    """Build ``src``'s sdist and, from it, its wheel into ``out`` with this environment's
    ``build`` (no isolation, no network; nothing but egg-info is written into ``src``);
    answers the wheel."""
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
    (wheel,) = out.glob("*.whl")
    return wheel


def dummy_project(root: Path) -> Path:
    """A project with its own top-level ``app`` package (``app.NAME == "dummy"``), the way
    a FastAPI service is usually laid out."""
    (root / "app").mkdir(parents=True)
    (root / "app" / "__init__.py").write_text('NAME = "dummy"\n')
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "dummy-fastapi-project"\nversion = "1.0"\n'
        '[tool.setuptools]\npackages = ["app"]\n')
    return root


def closure(requirements: Iterable[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``requirements`` need, transitively (with extras
    and environment markers), by canonical name."""
    found: dict[str, metadata.Distribution] = {}
    extras_seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        wanted = set(req.extras)
        if name in extras_seen and wanted <= extras_seen[name]:
            continue
        extras_seen.setdefault(name, set()).update(wanted)
        dist = found.setdefault(name, metadata.distribution(name))
        for line in dist.requires or []:
            sub = Requirement(line)
            envs = [{"extra": e} for e in ["", *extras_seen[name]]]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return found


def dependencies(name: str) -> list[metadata.Distribution]:
    """The installed runtime dependencies of distribution ``name`` (no extras), transitively."""
    found = closure([name])
    found.pop(canonicalize_name(name))
    return list(found.values())


class Venv:
    """A fresh virtual environment under ``root`` (no pip of its own: this environment's
    pip installs into it with ``--python``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        run([sys.executable, "-m", "venv", "--without-pip", str(root)])
        self.python = root / "bin" / "python"
        self.site = Path(sysconfig.get_path("purelib", vars={"base": str(root),
                                                             "platbase": str(root)}))

    def bin(self, name: str) -> str:
        return str(self.root / "bin" / name)

    def copy_in(self, dists: Iterable[metadata.Distribution]) -> None:
        """Install distributions by copying the files their RECORDs list (scripts and
        data outside site-packages are left out)."""
        for dist in dists:
            for f in dist.files or []:
                rel = f.as_posix()
                src = Path(str(f.locate()))
                if rel.startswith("..") or "__pycache__" in rel or not src.is_file():
                    continue
                dst = self.site / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)

    def pip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "pip", "--python", str(self.python), *args],
                   env={**os.environ, **PIP_ENV})

    def install(self, wheel: Path) -> None:
        """``pip install --no-index`` the wheel: its dependencies must be in already."""
        self.pip("install", "--no-index", "--no-cache-dir", str(wheel))

    def has(self, module: str) -> bool:
        """Whether ``module`` can be imported in this environment."""
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        return subprocess.run([str(self.python), "-I", "-c", code], timeout=60).returncode == 0
