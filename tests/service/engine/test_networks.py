"""The served network's outputs (``service.engine.networks``): a ``nodes.layers`` list that names one node twice is
a configuration error at load (one line naming the key; ``ood-serve`` stops), while a layer that is also the
``feature_maps`` node is one output under both keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.config_errors import describe_config_error
from service.demo import demo_model_configs
from service.engine.networks import NetworkConfigError, build_extractor, build_network, layer_keys
from service.settings import ModelConfig, NodesConfig, load_settings

ROOT = Path(__file__).resolve().parents[3]
ZOO_MODEL = (
    "{name: digits, source: zoo, architecture: digits-classifier, num_classes: 6, input_size: 32,"
    " preprocessing: {mode: L, mean: [0.5], std: [0.5]}, nodes: {logits: fc, feature_maps: body, layers: %s}}"
)


def _config(tmp_path: Path, layers: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - {ZOO_MODEL % layers}\nstate_dir: {tmp_path / 'states'}\napi_keys: k\n")
    return path


def test_a_layer_named_twice_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        load_settings(_config(tmp_path, "[body.2, body.7, body.2]"))
    message = describe_config_error(caught.value)
    assert message.startswith("models[0].nodes.layers: "), message
    assert "'body.2'" in message and "entries 0 and 2" in message, message
    with pytest.raises(ValidationError, match="named twice"):
        NodesConfig(logits="fc", layers=["body", "body"])


def test_ood_serve_stops_with_one_line_on_a_layer_named_twice(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOD_")}
    command = [sys.executable, "-m", "service", "--config", str(_config(tmp_path, "[body.7, body.7]"))]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == "" and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ood-serve: invalid configuration"), out.stderr
    assert "models[0].nodes.layers: " in lines[0] and "'body.7'" in lines[0], lines[0]


def test_a_config_that_skipped_validation_is_refused_by_the_extractor() -> None:
    """``model_construct`` / ``model_copy(update=...)`` skip the validators: the extractor checks again."""
    base = demo_model_configs()[0]
    nodes = NodesConfig.model_construct(logits="fc", features=None, feature_maps=None, layers=["body.2", "body.2"])
    config = ModelConfig.model_construct(**{**dict(base), "nodes": nodes})
    with pytest.raises(NetworkConfigError, match=r"nodes\.layers.*'body\.2'"):
        build_extractor(build_network(config), config)


def test_a_layer_that_is_also_the_feature_maps_node_is_one_output_under_both_keys(tmp_path: Path) -> None:
    config = load_settings(_config(tmp_path, "[body.2, body]")).models[0]
    extractor = build_extractor(build_network(config), config)
    with torch.inference_mode():
        outputs = extractor(torch.randn(2, 1, 32, 32))
    assert layer_keys(config) == ["layers.0", "layers.1"]
    assert torch.equal(outputs["layers.1"], outputs["feature_maps"])
    assert outputs["layers.0"].shape[:2] == (2, 16) and outputs["layers.1"].shape[:2] == (2, 64)
