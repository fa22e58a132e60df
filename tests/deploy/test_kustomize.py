"""The Kubernetes overlays (kustomize): each builds and validates against the pinned Kubernetes (kubernetes-validate);
the deployment's probes, security and wiring, the GPU request, selectors, the ConfigMap and environment as settings
the service accepts, the ServiceMonitor's key. Offline.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import K8S_VERSION, OVERLAYS, build, by_kind, tool


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates_against_pinned_kubernetes(overlay: str, tmp_path: Path) -> None:
    docs = build(overlay)
    core = [d for d in docs if d["kind"] != "ServiceMonitor"]  # a CRD: checked structurally below
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = subprocess.run(
        [tool("kubernetes-validate"), "-k", K8S_VERSION, "--strict", "--quiet", str(path)],
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
    docs = by_kind(build(overlay))
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
    configmaps = {d["metadata"]["name"] for d in build(overlay) if d["kind"] == "ConfigMap"}
    assert volumes[mounts["/etc/ood/config"]]["configMap"]["name"] in configmaps
    assert volumes[mounts["/etc/ood/api-keys"]]["secret"]["secretName"] == docs["Secret"]["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OOD_API_KEYS_FILE"].startswith("/etc/ood/api-keys/")
    # the grace period leaves time to drain the queue after the preStop delay
    assert pod["terminationGracePeriodSeconds"] > 30


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not() -> None:
    gpu = by_kind(build("gpu"))["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    cpu = by_kind(build("cpu"))["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay: str) -> None:
    docs = by_kind(build(overlay))
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_and_env_are_settings_the_service_accepts(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import Settings, load_settings

    docs = build(overlay)
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    config = tmp_path / "config.yaml"
    config.write_text(config_maps["ood-serve-config"]["data"]["config.yaml"])
    container = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(next(d for name, d in config_maps.items() if name.startswith("ood-serve-env"))["data"])
    known = {f"OOD_{field.upper()}" for field in Settings.model_fields}
    from_secrets = {e["name"] for e in container["env"] if "valueFrom" in e}
    assert set(env) | from_secrets <= known, f"unknown settings in the manifests: {sorted(set(env) - known)}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)
    assert str(settings.state_dir) == "/var/lib/ood"
    assert settings.device == ("cuda" if overlay == "gpu" else "cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_sends_a_key_the_server_accepts(overlay: str) -> None:
    """With ``OOD_REQUIRE_AUTH_FOR_READ=true`` ``/metrics`` needs a key: the ServiceMonitor sends the Secret's
    ``metrics-key`` as a bearer key and the Deployment gives the same Secret entry to the server as a key."""
    docs = build(overlay)
    kinds = by_kind(docs)
    (endpoint,) = kinds["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["authorization"]["type"] == "Bearer"
    reference = endpoint["authorization"]["credentials"]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert reference["key"] in secrets[reference["name"]]["stringData"]
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    keys = next(e for e in container["env"] if e["name"] == "OOD_API_KEYS")
    assert keys["valueFrom"]["secretKeyRef"] == {**reference, "optional": True}
