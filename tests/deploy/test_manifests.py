"""Offline validation of the Kubernetes manifests (kustomize + kubernetes-validate) and the Dockerfiles (hadolint)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"  # pinned: the oldest release we support
OVERLAYS = ("cpu", "gpu")


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (it comes with the dev extra)")
    return path


def _build(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates_against_pinned_kubernetes(overlay: str, tmp_path: Path) -> None:
    docs = _build(overlay)
    core = [d for d in docs if d["kind"] != "ServiceMonitor"]  # a CRD: checked structurally below
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = subprocess.run(
        [_tool("kubernetes-validate"), "-k", K8S_VERSION, "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {d["kind"] for d in docs}
    assert kinds >= {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Secret",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_probes_security_and_wiring(overlay: str) -> None:
    docs = _by_kind(_build(overlay))
    dep = docs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "limits" in container["resources"] and "requests" in container["resources"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = volumes[mounts["/var/lib/ood"]]
    assert state["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    configmaps = {d["metadata"]["name"] for d in _build(overlay) if d["kind"] == "ConfigMap"}
    assert volumes[mounts["/etc/ood/config"]]["configMap"]["name"] in configmaps
    assert volumes[mounts["/etc/ood/api-keys"]]["secret"]["secretName"] == docs["Secret"]["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OOD_API_KEYS_FILE"].startswith("/etc/ood/api-keys/")
    # the grace period leaves time to drain the queue after the preStop delay
    assert pod["terminationGracePeriodSeconds"] > 30


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not() -> None:
    gpu = _by_kind(_build("gpu"))["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    cpu = _by_kind(_build("cpu"))["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay: str) -> None:
    docs = _by_kind(_build(overlay))
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [
        docs["Deployment"]["spec"]["selector"]["matchLabels"],
        docs["Service"]["spec"]["selector"],
        docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    monitor = docs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= docs["Service"]["metadata"]["labels"].items()
    port_names = {p["name"] for p in docs["Service"]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_are_hadolint_clean(dockerfile: str) -> None:
    result = subprocess.run([_tool("hadolint"), str(ROOT / "docker" / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_wires_service_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"ood-serve", "prometheus", "grafana"} <= services.keys()
    prom = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert any(t.startswith("ood-serve:") for t in targets)
    panels = json.loads((ROOT / "deploy" / "grafana" / "ood-serve.json").read_text())["panels"]
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("request rate", "latency", "batch size", "queue depth", "ood rate", "score"):
        assert word in titles


def _exported_metric_names() -> set[str]:
    from service.metrics import ServiceMetrics

    names: set[str] = set()
    for family in ServiceMetrics([]).registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_dashboard_and_smoke_check_use_metrics_the_service_exports() -> None:
    exported = _exported_metric_names()
    dashboard = (ROOT / "deploy" / "grafana" / "ood-serve.json").read_text()
    used = set(re.findall(r"\bood_[a-z_]+", dashboard)) - {"ood_serve"}
    assert used, "the dashboard queries no ood_* metric"
    assert used <= exported, f"dashboard queries unknown metrics: {sorted(used - exported)}"
    smoke = (ROOT / "docker" / "smoke_check.py").read_text()
    expected = set(re.findall(r'"(ood_[a-z_]+)"', smoke.split("EXPECTED_METRICS", 1)[1].split("\n", 1)[0]))
    assert expected and expected <= exported, f"smoke check expects unknown metrics: {sorted(expected - exported)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_and_env_are_settings_the_service_accepts(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import Settings, load_settings

    docs = _build(overlay)
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    config = tmp_path / "config.yaml"
    config.write_text(config_maps["ood-serve-config"]["data"]["config.yaml"])
    container = _by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(next(d for name, d in config_maps.items() if name.startswith("ood-serve-env"))["data"])
    known = {f"OOD_{field.upper()}" for field in Settings.model_fields}
    assert set(env) <= known, f"unknown settings in the manifests: {sorted(set(env) - known)}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)
    assert str(settings.state_dir) == "/var/lib/ood"
    assert settings.device == ("cuda" if overlay == "gpu" else "cpu")
