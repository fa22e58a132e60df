"""The drift alert rules (``deploy/prometheus/rules.yaml``) are valid Prometheus rules, fire as their unit tests
say (``promtool test rules``), and query only metrics that ``/metrics`` exports; the Grafana drift row too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ood-serve.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (Debian's prometheus package; .ci/run installs it)"
)


def _exported() -> set[str]:
    return {family.name for family in ServiceMetrics([]).registry.collect()}


def _promtool(*args: str) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    _promtool("check", "rules", RULES.name)


@needs_promtool
def test_the_alerts_fire_as_their_unit_tests_say() -> None:
    _promtool("test", "rules", "rules.test.yaml")


def test_rules_and_the_drift_row_query_exported_drift_gauges() -> None:
    exported = _exported()
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {"OODScoreDrift", "OODShareExcess"}
    used = {name for rule in rules for name in re.findall(r"\bood_[a-z_]+", rule["expr"])}
    assert used and used <= exported, sorted(used - exported)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    row = next(i for i, p in enumerate(panels) if p["type"] == "row" and "drift" in p["title"].lower())
    following = [p["type"] == "row" for p in panels[row + 1 :]] + [True]
    drift_panels = panels[row + 1 : row + 1 + following.index(True)]
    queries = " ".join(t["expr"] for p in drift_panels for t in p.get("targets", []))
    assert {"ood_drift_ks_p_value", "ood_drift_share_p_value", "ood_drift_ood_share"} <= set(
        re.findall(r"\bood_[a-z_]+", queries)
    )
