"""The deployment files say what the code does: compose's API answers callers in its
network, and the Kubernetes manifests in ``deploy/kubernetes/`` are valid (the Kubernetes
JSON schema, via ``kubernetes-validate``) and match compose: the same image, commands
and probe paths (``/livez`` liveness, ``/readyz`` readiness)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _compose_default(value: str) -> str:
    """``${NAME:-default}`` -> ``default`` (what compose uses when NAME is unset)."""
    assert value.startswith("${") and ":-" in value, value
    return value[value.index(":-") + 2:-1]


@pytest.mark.slow
def test_compose_api_answers_callers_in_its_network_by_the_service_name(
        tmp_path: Path, redis_server_url: str, redis_prefix: str) -> None:
    """Before: compose set no allowed hosts, so ``http://api:8000`` from another container
    was refused ``421 invalid_host``. The API runs here with compose's setting."""
    allowed = _compose_default(_compose()["services"]["api"]["environment"]
                               ["AUTONOMY_ALLOWED_HOSTS"])
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AUTONOMY_") and k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DATABASE_URL=f"sqlite:///{tmp_path / 'c.db'}", REDIS_URL=redis_server_url,
               AUTONOMY_REDIS_PREFIX=redis_prefix, AUTONOMY_ALLOWED_HOSTS=allowed)
    assert subprocess.run([sys.executable, "-m", "app.cli", "db", "upgrade"], env=env,
                          capture_output=True, timeout=60).returncode == 0
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/livez", timeout=5)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"serve never answered; its output:\n{log.read_text()}"
                time.sleep(0.1)
        for host in ("api:8000", "api", "localhost:8000", "127.0.0.1:8000"):
            resp = httpx.get(f"{base}/readyz", headers={"Host": host}, timeout=10)
            assert resp.status_code == 200, (host, resp.text)
        resp = httpx.get(f"{base}/readyz", headers={"Host": "evil.example"}, timeout=10)
        assert resp.status_code == 421
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")))
def test_each_kubernetes_manifest_is_valid_against_the_kubernetes_schema(path: str) -> None:
    docs = [d for d in yaml.safe_load_all((K8S / path).read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _containers(kind: str) -> dict[str, dict[str, Any]]:
    found = {}
    for doc in _manifests():
        if doc["kind"] == kind:
            spec = doc["spec"]["template"]["spec"]
            for c in spec["containers"]:
                found[c["name"]] = c
    return found


def test_the_kubernetes_parts_are_compose_s_parts_with_the_same_image_and_commands() -> None:
    compose = _compose()
    services = compose["services"]
    deployments = _containers("Deployment")
    jobs = _containers("Job")
    assert set(deployments) == {"api", "worker", "beat", "flower"}
    assert set(jobs) == {"migrate"}
    image = compose["x-app"]["image"]
    for name, c in {**deployments, **jobs}.items():
        assert c["image"] == image, name
        assert c["command"] == services[name]["command"], name
        assert {r.get("secretRef", {}).get("name") for r in c["envFrom"]} >= {"autonomy"}
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _manifests()}
    assert {("Service", "autonomy-api"), ("Secret", "autonomy"),
            ("ConfigMap", "autonomy")} <= kinds


def test_the_api_probes_are_livez_and_readyz_sent_as_a_host_the_api_answers() -> None:
    from app.api.guard import host_allowed
    from app.settings import Settings

    api = _containers("Deployment")["api"]
    live, ready = api["livenessProbe"]["httpGet"], api["readinessProbe"]["httpGet"]
    assert live["path"] == "/livez" and ready["path"] == "/readyz"
    config = next(d for d in _manifests() if d["kind"] == "ConfigMap")["data"]
    settings = Settings(allowed_hosts=config["AUTONOMY_ALLOWED_HOSTS"])
    for probe in (live, ready):
        host = {h["name"]: h["value"] for h in probe["httpHeaders"]}["Host"]
        assert host_allowed(settings, host), host
    assert host_allowed(settings, "autonomy-api:8000")  # the Service, in-cluster
    # compose's API healthcheck probes the same readiness path
    assert "/readyz" in " ".join(_compose()["services"]["api"]["healthcheck"]["test"])
    for doc in _manifests():
        if doc["kind"] == "Secret":
            assert set(doc["stringData"]) >= {"DATABASE_URL", "REDIS_URL",
                                              "AUTONOMY_API_TOKEN"}


def test_scaling_docs_name_readyz_as_the_kubernetes_readiness_path() -> None:
    text = (ROOT / "docs" / "scaling.md").read_text()
    k8s = text[text.index("### Kubernetes"):]
    k8s = k8s[:k8s.index("\n## ")]
    assert "readiness on `/readyz`" in k8s and "/api/autonomy/status" not in k8s
