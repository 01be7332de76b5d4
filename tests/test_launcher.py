"""The ``autonomy`` console script's launcher (``autonomy_launcher``): ``app`` must be this
distribution's package before anything of it is imported. The installed-wheel case (another
wheel's ``app/__init__.py`` over ours) is in ``tests/test_packaging.py``; these cover a
source tree or editable install, where another ``app`` earlier on the path shadows ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import autonomy_launcher

REPO = Path(__file__).resolve().parent.parent


def test_this_environments_app_is_ours() -> None:
    assert autonomy_launcher.foreign_app() is None


def test_another_app_earlier_on_the_path_is_refused_with_exit_2_before_importing_it(
        tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    # importing this package would say so: the launcher must refuse before it does
    (tmp_path / "app" / "__init__.py").write_text("raise SystemExit('imported the other app')\n")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
            "import autonomy_launcher; autonomy_launcher.main()")
    proc = subprocess.run([sys.executable, "-c", code, "--version"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "another installed package provides a top-level 'app'" in proc.stderr
    assert str(tmp_path / "app" / "__init__.py") in proc.stderr
    assert "install autonomy into its own virtual environment" in proc.stderr
    assert "imported the other app" not in proc.stderr
