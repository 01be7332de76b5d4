"""scripts/audit-pins (``make audit``, run by CI): PyPI's advisories for each pin, by its
release's JSON page or, where that answers 404, by its project's page when the pin is the
latest release. A real HTTP server here plays PyPI's JSON API with made-up advisories."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "audit-pins"

ADVISORY: dict[str, object] = {
    "id": "PYSEC-2099-1", "aliases": ["CVE-2099-0001"], "fixed_in": ["1.0.1"],
    "link": "https://osv.dev/vulnerability/PYSEC-2099-1", "withdrawn": None}


def page(version: str, vulns: list[dict[str, object]]) -> dict[str, object]:
    return {"info": {"version": version}, "vulnerabilities": vulns}


# path -> (status, JSON); what a mirror that serves only project pages answers is 404 for
# every release page
PAGES: dict[str, tuple[int, object]] = {
    "/pypi/okpkg/json": (200, page("2.0", [])),
    "/pypi/vulnrel/1.0/json": (200, page("1.0", [ADVISORY])),
    "/pypi/vulnlatest/json": (200, page("1.0", [ADVISORY])),
    "/pypi/withdrawn/json": (200, page("3.0", [dict(ADVISORY, withdrawn="2099-02-01")])),
    "/pypi/behind/json": (200, page("9.0", [])),
    "/pypi/broken/json": (500, {"message": "internal"}),
}


class FakePyPI(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = PAGES.get(self.path, (404, {"message": "Not Found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def index() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakePyPI)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join(10)


def audit(index: str, tmp_path: Path, pins: list[str], *args: str
          ) -> subprocess.CompletedProcess[str]:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# pins\n" + "\n".join(pins) + "\n")
    return subprocess.run([sys.executable, str(SCRIPT), "--index-url", index, "--timeout", "10",
                           *args, str(constraints)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_clean_latest_pin_passes(index: str, tmp_path: Path) -> None:
    r = audit(index, tmp_path, ["okpkg==2.0", "withdrawn==3.0"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 pins; checked 0 by their release's page and 2 as their project's latest " \
           "release; 0 unchecked, 0 lookups failed; 0 known vulnerabilities" in r.stdout


def test_an_advisory_on_the_release_page_fails_the_audit(index: str, tmp_path: Path) -> None:
    r = audit(index, tmp_path, ["okpkg==2.0", "vulnrel==1.0"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "VULNERABLE vulnrel==1.0: PYSEC-2099-1 (aliases CVE-2099-0001; fixed in 1.0.1)" \
        in r.stdout
    assert "checked 1 by their release's page" in r.stdout


def test_a_mirror_without_release_pages_still_checks_a_latest_pin(
        index: str, tmp_path: Path) -> None:
    r = audit(index, tmp_path, ["vulnlatest==1.0"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "VULNERABLE vulnlatest==1.0: PYSEC-2099-1" in r.stdout


def test_an_ignored_advisory_by_its_alias_passes(index: str, tmp_path: Path) -> None:
    r = audit(index, tmp_path, ["vulnlatest==1.0"], "--ignore-vuln", "CVE-2099-0001")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 known vulnerabilities (1 ids ignored)" in r.stdout


def test_a_pin_that_cannot_be_looked_up_is_listed_and_strict_fails_on_it(
        index: str, tmp_path: Path) -> None:
    r = audit(index, tmp_path, ["behind==1.0", "okpkg==2.0"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unchecked  behind==1.0: not the latest release (9.0)" in r.stdout
    assert "1 unchecked" in r.stdout
    strict = audit(index, tmp_path, ["behind==1.0", "okpkg==2.0"], "--strict")
    assert strict.returncode == 1, strict.stdout + strict.stderr


def test_an_index_that_fails_is_an_error_not_a_pass(index: str, tmp_path: Path) -> None:
    r = audit(index, tmp_path, ["okpkg==2.0", "broken==1.0"])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error      broken==1.0: HTTPError: HTTP Error 500" in r.stderr
    assert "1 lookups failed" in r.stdout
    gone = audit(index, tmp_path, ["nosuchpkg==1.0"])
    assert gone.returncode == 2 and "not on the index" in gone.stderr


def test_a_file_without_pins_is_an_error(index: str, tmp_path: Path) -> None:
    r = audit(index, tmp_path, ["okpkg>=1"])
    assert r.returncode == 2 and "no NAME==VERSION pins" in r.stderr
