"""The KServe (V2) manifests: they build and their pod validates against the pinned Kubernetes, the predictor serves
V2 with probes on the V2 health routes, the wiring and settings are what the service accepts. Offline.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import K8S_VERSION, ROOT, by_kind, tool

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
    out = subprocess.run([tool("kubectl"), "kustomize", str(KSERVE)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _validate(docs: list[dict[str, Any]], path: Path) -> None:
    path.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [tool("kubernetes-validate"), "-k", K8S_VERSION, "--strict", "--quiet", str(path)],
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
    runtime, isvc = by_kind(docs)["ServingRuntime"], by_kind(docs)["InferenceService"]
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
    docs = by_kind(_kserve())
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
    docs = by_kind(built)
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
