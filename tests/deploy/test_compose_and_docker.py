"""The Dockerfiles (hadolint), the compose file (service, Prometheus, Grafana, the scrape key) and the dashboard and
smoke check, which must use metrics the service exports. Offline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.manifests import ROOT, tool


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_are_hadolint_clean(dockerfile: str) -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / "docker" / dockerfile)], capture_output=True, text=True)
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
