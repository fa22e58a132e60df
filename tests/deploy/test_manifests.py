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


# ---------------------------------------------------------------------------------------------- KServe (V2)
KSERVE = ROOT / "deploy" / "kserve"
PREDICTOR_EXTENSION_FIELDS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency", "timeout",
    "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy", "autoScaling",
}  # fmt: skip
"""KServe's ``ComponentExtensionSpec`` (v1beta1): the predictor's fields besides ``model`` and the pod's."""
SERVING_RUNTIME_FIELDS = {
    "supportedModelFormats", "multiModel", "disabled", "protocolVersions", "workerSpec", "containers", "volumes",
    "nodeSelector", "affinity", "tolerations", "labels", "annotations", "imagePullSecrets", "hostIPC",
    "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint", "replicas", "storageHelper", "builtInAdapter",
}  # fmt: skip
"""KServe's ``ServingRuntimeSpec`` (v1alpha1, ``pkg/apis/serving/v1alpha1/servingruntime_types.go``)."""
MODEL_FIELDS = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage"}


def _kserve() -> list[dict[str, Any]]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(KSERVE)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _validate(docs: list[dict[str, Any]], path: Path) -> None:
    path.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [_tool("kubernetes-validate"), "-k", K8S_VERSION, "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kserve_manifests_build_and_their_pod_validates_against_pinned_kubernetes(tmp_path: Path) -> None:
    """KServe's CRDs cannot be validated offline: the core objects are, and so is the Pod KServe builds from the
    ServingRuntime's containers and volumes and the predictor's pod fields; the CR fields are checked against
    KServe's types."""
    docs = _kserve()
    core_kinds = {"ServiceAccount", "ConfigMap", "Secret", "PersistentVolumeClaim"}
    assert {d["kind"] for d in docs} == core_kinds | {"ServingRuntime", "InferenceService"}
    _validate([d for d in docs if "kserve.io" not in d["apiVersion"]], tmp_path / "core.yaml")
    runtime, isvc = _by_kind(docs)["ServingRuntime"], _by_kind(docs)["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert set(runtime["spec"]) <= SERVING_RUNTIME_FIELDS
    predictor = dict(isvc["spec"]["predictor"])
    assert set(predictor.pop("model")) <= MODEL_FIELDS
    pod_fields = {k: v for k, v in predictor.items() if k not in PREDICTOR_EXTENSION_FIELDS}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ood-serve-predictor"},
        "spec": {**pod_fields, "containers": runtime["spec"]["containers"], "volumes": runtime["spec"]["volumes"]},
    }
    _validate([pod], tmp_path / "pod.yaml")  # strict: an unknown pod or container field fails


def test_kserve_predictor_serves_v2_with_probes_on_the_v2_health_routes() -> None:
    docs = _by_kind(_kserve())
    runtime, isvc = docs["ServingRuntime"], docs["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["runtime"] == runtime["metadata"]["name"]
    assert "v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["image"] == "ood-serve:0.1.0"
    (port,) = container["ports"]
    assert _arg(container["args"], "--port") == str(port["containerPort"])
    assert _arg(container["args"], "--host") == "0.0.0.0"
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/ready"
    assert all(probe["port"] == port["containerPort"] for probe in probes.values())
    assert isvc["spec"]["predictor"]["minReplicas"] >= 1  # never scaled to zero: replicas hold the batch queue


def test_kserve_wiring_and_settings_are_what_the_service_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import Settings, load_settings

    built = _kserve()
    docs = _by_kind(built)
    runtime, isvc = docs["ServingRuntime"], docs["InferenceService"]
    (container,) = runtime["spec"]["containers"]
    names = {(d["kind"], d["metadata"]["name"]) for d in built}
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)
    assert ("PersistentVolumeClaim", volumes["state"]["persistentVolumeClaim"]["claimName"]) in names
    assert ("ConfigMap", volumes["config"]["configMap"]["name"]) in names
    assert ("Secret", volumes["api-keys"]["secret"]["secretName"]) in names
    assert ("ServiceAccount", isvc["spec"]["predictor"]["serviceAccountName"]) in names
    (env_from,) = container["envFrom"]
    assert ("ConfigMap", env_from["configMapRef"]["name"]) in names  # no hash suffix: KServe's CR is not rewritten
    env = {e["name"]: e["value"] for e in container["env"]}
    env.update(next(d for d in built if d["metadata"]["name"] == env_from["configMapRef"]["name"])["data"])
    known = {f"OOD_{field.upper()}" for field in Settings.model_fields}
    assert set(env) <= known, f"unknown settings in the manifests: {sorted(set(env) - known)}"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "config.yaml"
    config.write_text(next(d for d in built if d["metadata"]["name"] == "ood-serve-config")["data"]["config.yaml"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert _arg(container["args"], "--config").startswith(mounts["config"] + "/")
    settings = load_settings(config)
    assert str(settings.state_dir) == mounts["state"] and settings.device == "cpu"
    assert str(settings.api_keys_file).startswith(mounts["api-keys"] + "/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_sends_a_key_the_server_accepts(overlay: str) -> None:
    """With ``OOD_REQUIRE_AUTH_FOR_READ=true`` ``/metrics`` needs a key: the ServiceMonitor sends the Secret's
    ``metrics-key`` as a bearer key and the Deployment gives the same Secret entry to the server as a key."""
    docs = _build(overlay)
    kinds = _by_kind(docs)
    (endpoint,) = kinds["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["authorization"]["type"] == "Bearer"
    reference = endpoint["authorization"]["credentials"]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert reference["key"] in secrets[reference["name"]]["stringData"]
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    keys = next(e for e in container["env"] if e["name"] == "OOD_API_KEYS")
    assert keys["valueFrom"]["secretKeyRef"] == {**reference, "optional": True}


def test_prometheus_scrape_config_sends_the_key_compose_gives_the_server() -> None:
    prom = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "ood-serve"]
    assert job["authorization"]["type"] == "Bearer"
    key_file = job["authorization"]["credentials_file"]
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    mounted = {c["target"]: c["source"] for c in compose["services"]["prometheus"]["configs"]}
    content = compose["configs"][mounted[key_file]]["content"]
    assert content == "${OOD_METRICS_KEY:-}"
    server_keys = compose["services"]["ood-serve"]["environment"]["OOD_API_KEYS"]
    assert content in server_keys.split(",")  # the scrape key is one of the server's keys
    promtool = shutil.which("promtool")
    if promtool is not None:  # Debian's prometheus package
        result = subprocess.run(
            [promtool, "check", "config", "--syntax-only", str(ROOT / "docker" / "prometheus.yml")],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
