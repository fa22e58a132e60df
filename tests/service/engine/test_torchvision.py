"""A torchvision model from config: resnet18 with random weights saved as safetensors, tiny input, loaded from a
YAML file through OOD_CONFIG; detectors uploaded and fitted through its heads (in-process)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from ood_core.detector import EnergyBased
from ood_core.state import save_detector
from service.engine.served_model import ServedModel
from service.settings import load_settings
from tests.service.conftest import API_KEY, AUTH, AppRunner, png_bytes
from tests.service.jobs.archives import wait_job

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppRunner]:
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), str(folder / "r18.safetensors"))
    lraspp = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3
    )
    save_file(lraspp.state_dict(), str(folder / "lraspp.safetensors"))
    config = {
        "state_dir": str(folder / "states"),
        "api_keys": API_KEY,
        "max_batch_size": 8,
        "models": [
            {
                "name": "r18",
                "architecture": "resnet18",
                "weights": str(folder / "r18.safetensors"),
                "num_classes": 5,
                "labels": ["a", "b", "c", "d", "e"],
                "input_size": 40,
                "preprocessing": {"mode": "RGB", "resize": 48, "crop": 40},
                "nodes": {"logits": "fc", "features": "flatten", "feature_maps": "layer4"},
                "heads": {"features": ["fc"], "feature_maps": ["avgpool", "fc"]},
            },
            {
                "name": "seg",
                "architecture": "lraspp_mobilenet_v3_large",
                "task": "segmentation",
                "weights": str(folder / "lraspp.safetensors"),
                "num_classes": 3,
                "input_size": [32, 48],
                "nodes": {"logits": "interpolate", "feature_maps": "backbone.16"},
                "max_batch_size": 4,
            },
        ],
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = AppRunner(load_settings(path))
    yield runner
    runner.close()


def rgb(seed: int, size: tuple[int, int] = (60, 50)) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def test_model_is_described_from_the_config(app: AppRunner) -> None:
    model = app.get("/v1/models/r18").json()
    assert model["task"] == "classification" and model["classes"] == ["a", "b", "c", "d", "e"]
    assert model["input_size"] == [40, 40] and model["detectors"] == []


def test_uploaded_state_scores_and_wrong_dimensions_are_refused(app: AppRunner) -> None:
    state = save_detector(EnergyBased())
    headers = {**AUTH, "Content-Type": "application/octet-stream"}
    assert app.put("/v1/models/r18/detectors/energy", content=state, headers=headers).status_code == 201
    response = app.post("/v1/models/r18/score", files=[("files", ("x.png", rgb(0)))])
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["prediction"]["label"] in "abcde"
    assert np.isfinite(result["detectors"]["energy"]["score"])


def test_fit_through_the_heads(app: AppRunner) -> None:
    instances = [{"b64": base64.b64encode(rgb(i)).decode(), "label": i % 5} for i in range(20)]
    for cls, name in (("KNN", "knn"), ("ReAct", "react")):
        body = {"detector_class": cls, "hparams": {"k": 1} if cls == "KNN" else {}, "instances": instances}
        response = app.post(f"/v1/models/r18/detectors/{name}/fit", json=body, headers=AUTH)
        assert response.status_code == 202, response.text
        job = wait_job(app, response.json()["id"])
        assert job["state"] == "done", job
    scored = app.post("/v1/models/r18/score?detectors=knn,react", json={"instances": instances[:3]}).json()
    assert all(set(r["detectors"]) == {"knn", "react"} for r in scored["results"])
    assert all(r["detectors"]["react"]["threshold"] is not None for r in scored["results"])


def test_grayscale_and_odd_sizes_are_converted(app: AppRunner) -> None:
    gray = png_bytes(np.random.default_rng(1).integers(0, 256, (17, 90), dtype=np.uint8))
    assert app.post("/v1/models/r18/score", files=[("files", ("g.png", gray))]).status_code == 200


def test_missing_weights_file_is_reported(tmp_path: Path) -> None:
    from service.engine.networks import NetworkConfigError, build_network
    from service.settings import ModelConfig, NodesConfig

    config = ModelConfig(
        name="x",
        architecture="resnet18",
        num_classes=3,
        input_size=(32, 32),
        nodes=NodesConfig(logits="fc"),
        weights=None,
    )
    with pytest.raises(NetworkConfigError, match="safetensors"):
        build_network(config)


def test_torchvision_segmentation_model(app: AppRunner) -> None:
    assert [m["name"] for m in app.get("/v1/models").json()["models"]] == ["r18", "seg"]
    headers = {**AUTH, "Content-Type": "application/octet-stream"}
    assert (
        app.put("/v1/models/seg/detectors/energy", content=save_detector(EnergyBased()), headers=headers).status_code
        == 201
    )
    response = app.post(
        "/v1/models/seg/segment?format=json&size=original", files=[("files", ("x.png", rgb(2, (30, 20))))]
    )
    assert response.status_code == 200, response.text
    energy = response.json()["results"][0]["detectors"]["energy"]
    assert np.asarray(energy["map"]["data"]).shape == (30, 20)
    assert energy["threshold"] is None and energy["ood_share"] is None


def test_readme_example_config_builds_resnet18_and_deeplabv3_resnet50(tmp_path: Path) -> None:
    """The YAML example in service/README.md, with random weights and a smaller input (for speed): every graph node
    and head it names exists, and one forward gives logits, features and feature maps."""
    readme = (Path(__file__).resolve().parents[3] / "service" / "README.md").read_text(encoding="utf-8")
    match = re.search(r"```yaml\n(.*?)```", readme, flags=re.S)
    assert match, "no yaml block in service/README.md"
    config = yaml.safe_load(match.group(1))
    assert [m["architecture"] for m in config["models"]] == ["resnet18", "deeplabv3_resnet50"]
    for entry in config["models"]:
        if entry.get("task") == "segmentation":
            network = torchvision.models.segmentation.deeplabv3_resnet50(
                weights=None, weights_backbone=None, num_classes=entry["num_classes"], aux_loss=False
            )
        else:
            network = torchvision.models.resnet18(weights=None, num_classes=entry["num_classes"])
        entry["weights"] = str(tmp_path / f"{entry['name']}.safetensors")
        save_file(network.state_dict(), entry["weights"])
        entry["input_size"] = 64
        if "preprocessing" in entry:
            entry["preprocessing"].update(resize=72, crop=64)
    settings = load_settings(**{**config, "state_dir": tmp_path / "states", "device": "cpu"})
    r18, seg = (ServedModel(m, settings) for m in settings.models)
    assert r18.dims == {"logits": 10, "features": 512, "feature_maps": 512}
    assert tuple(r18.probe["feature_maps"].shape[:2]) == (2, 512) and r18.probe["feature_maps"].dim() == 4
    for kind in ("features", "feature_maps"):  # the configured heads map each output back to the logits
        head = r18.heads[kind]
        assert head is not None and torch.allclose(head(r18.probe[kind]), r18.probe["logits"], atol=1e-5)
    assert seg.task == "segmentation" and seg.dims == {"logits": 21, "feature_maps": 2048}
    assert tuple(seg.probe["logits"].shape) == (2, 21, 64, 64)  # the "interpolate" node: at input resolution
