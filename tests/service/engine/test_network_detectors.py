"""Detectors that run the network themselves (ODIN, MCD, MahalanobisODIN, GradNorm, GradUncertainty, NACUE) and
those that read several layers (Gram, MultiMahalanobis), served by the batch worker: their scores equal the same
detector run by the library on the zoo network and the same preprocessed inputs, in-process (also for rows of a
batch that asked for them alone) and over real HTTP; their time per batch is in ``/metrics``; MCM is refused."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch import Tensor, nn

from ood_core.api import Detector
from ood_core.data import load_split
from ood_core.detector import (
    MCD,
    MCM,
    NACUE,
    ODIN,
    EnergyBased,
    GradNorm,
    GradUncertainty,
    Gram,
    MahalanobisODIN,
    MultiMahalanobis,
)
from ood_core.state import save_detector
from ood_core.zoo import DIGITS_STD, DigitsCNN, DigitsSegmenter, load_classifier, load_segmenter
from service.demo import demo_model_configs
from service.engine.active import ActiveDetector, StoredState
from service.engine.items import ScoreItem
from service.engine.scoring import process_batch
from service.engine.served_model import ServedModel
from service.errors import UnservableDetectorError
from service.settings import ModelConfig, NodesConfig, Settings, load_settings
from service.states.validate import build_detector
from tests.service.conftest import API_KEY, AUTH, digit_png, noise_png, serve

pytestmark = pytest.mark.timeout(300)

LAYERS = ["body.2", "body.7", "body"]
"""The digits classifier's stages (after each max-pooling and the last conv): ``body[:3]``, ``body[3:8]``, ``body``;
``body`` is also the ``feature_maps`` node."""
RTOL = ATOL = 1e-5


def stages(net: DigitsCNN) -> list[nn.Module]:
    return [net.body[:3], net.body[3:8], net.body[8:]]


#: state name -> the detector on the zoo network itself (fitted on the fit loader where it needs a fit)
CASES: dict[str, Callable[[DigitsCNN], Detector]] = {
    "odin": lambda net: ODIN(net, eps=0.01, norm_std=[DIGITS_STD]),
    "maha-odin": lambda net: MahalanobisODIN(nn.Sequential(net.body, net.pool), eps=0.01, norm_std=[DIGITS_STD]),
    "gradnorm": lambda net: GradNorm(net, ["fc.weight"], micro_batch_size=4),
    "graduncertainty": lambda net: GradUncertainty(net, ["body.8", "fc"]),
    "nacue": lambda net: NACUE(net, [net.body[2], net.body[7], net.body], m_bins=10, o_star=5),
    "gram": lambda net: Gram(net.head_from_maps, stages(net), 6),
    "multi-maha": lambda net: MultiMahalanobis(stages(net)),
}


def layers_config(name: str = "digits-layers") -> ModelConfig:
    base = demo_model_configs()[0]
    nodes = NodesConfig(logits="fc", features="pool", feature_maps="body", layers=LAYERS)
    return base.model_copy(update={"name": name, "nodes": nodes})


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    models = [layers_config(), demo_model_configs()[1]]
    return load_settings(state_dir=tmp_path_factory.mktemp("network-detectors"), api_keys=API_KEY, models=models)


@pytest.fixture(scope="module")
def served(settings: Settings) -> ServedModel:
    return ServedModel(layers_config(), settings)


@pytest.fixture(scope="module")
def net() -> DigitsCNN:
    return load_classifier(device="cpu")


def preprocessed(model: ServedModel, pixels: list[Tensor]) -> Tensor:
    """The inputs the batch worker gives the detectors (normalized on the model's device, one row per image)."""
    return model.loop_inputs(model.stage(pixels))


@pytest.fixture(scope="module")
def test_pixels(served: ServedModel) -> list[Tensor]:
    images = torch.cat([load_split("test")[0][:6], load_split("near_ood")[0][:3], load_split("uniform")[0][:3]])
    return served.preprocessor.pixels_from_tensor(images)


@pytest.fixture(scope="module")
def library(net: DigitsCNN, served: ServedModel) -> dict[str, Detector]:
    """Every case built on the zoo network, fitted by the library on 300 preprocessed training images."""
    images, labels = load_split("train")
    x = preprocessed(served, served.preprocessor.pixels_from_tensor(images[:300]))
    loader = [(x[i : i + 100], labels[i : i + 100]) for i in range(0, 300, 100)]
    return {name: make(net).fit(loader) for name, make in CASES.items()}


def active(name: str, detector: Detector) -> ActiveDetector:
    stored = StoredState("digits-layers", name, 1, "0" * 64, 1, type(detector).__name__, "2026-01-01T00:00:00Z")
    return ActiveDetector(name, detector, stored)


def served_scores(model: ServedModel, pixels: list[Tensor], detectors: list[ActiveDetector]) -> dict[str, Tensor]:
    results = process_batch(model, [ScoreItem(p, tuple(detectors)) for p in pixels])
    return {a.name: torch.tensor([r.scores[a.name] for r in results]) for a in detectors}


@pytest.mark.parametrize("name", list(CASES))
def test_served_scores_equal_the_librarys_on_the_same_inputs(
    name: str, served: ServedModel, library: dict[str, Detector], test_pixels: list[Tensor]
) -> None:
    detector = build_detector(served, save_detector(library[name]))
    assert type(detector) is type(library[name]) and detector.input_kind in ("input", "multi_features")
    got = served_scores(served, test_pixels, [active(name, detector)])[name]
    want = library[name].predict(preprocessed(served, test_pixels)).float()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_rows_that_did_not_ask_are_not_scored_and_the_others_score_the_same(
    served: ServedModel, library: dict[str, Detector], test_pixels: list[Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    grad = active("gradnorm", build_detector(served, save_detector(library["gradnorm"])))
    gram = active("gram", build_detector(served, save_detector(library["gram"])))
    energy = active("energy", build_detector(served, save_detector(EnergyBased())))
    alone = served_scores(served, test_pixels, [grad, gram])
    items = [ScoreItem(p, (grad, gram) if i % 3 == 0 else (energy,)) for i, p in enumerate(test_pixels)]
    seen: list[int] = []
    predict = grad.detector.predict

    def counted(x: Tensor) -> Tensor:
        seen.append(len(x))
        return predict(x)

    monkeypatch.setattr(grad.detector, "predict", counted)
    results = process_batch(served, items)
    assert seen == [4]  # the 4 rows that selected it
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert result.scores["gradnorm"] == pytest.approx(float(alone["gradnorm"][i]), rel=1e-5, abs=1e-6)
            assert result.scores["gram"] == pytest.approx(float(alone["gram"][i]), rel=1e-5, abs=1e-6)
        else:
            assert set(result.scores) == {"energy"}

    def refuse(staged: object) -> Tensor:
        raise AssertionError("no network-in-the-loop detector was selected: the inputs are not needed")

    monkeypatch.setattr(served, "loop_inputs", refuse)
    assert len(process_batch(served, [ScoreItem(p, (energy, gram)) for p in test_pixels])) == len(test_pixels)


def test_mcd_is_sampled_like_the_library(served: ServedModel, net: DigitsCNN, test_pixels: list[Tensor]) -> None:
    mcd = active("mcd", build_detector(served, save_detector(MCD(None, samples=4))))
    torch.manual_seed(7)
    got = served_scores(served, test_pixels, [mcd])["mcd"]
    torch.manual_seed(7)
    want = MCD(net, samples=4).predict(preprocessed(served, test_pixels))
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)
    assert all(not m.training for m in served.extractor.modules())  # dropout back in eval mode


def test_odin_and_mcd_give_maps_on_the_segmenter(settings: Settings) -> None:
    segmenter: DigitsSegmenter = load_segmenter(device="cpu")
    model = ServedModel(demo_model_configs()[1], settings)
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    pixels = model.preprocessor.pixels_from_tensor(images)
    odin = active("odin", build_detector(model, save_detector(ODIN(None, eps=0.01))))
    items = [ScoreItem(p, (odin,), map_size=(32, 32)) for p in pixels]
    results = process_batch(model, items)
    assert all(r.maps["odin"].shape == (32, 32) for r in results)
    want = ODIN(segmenter, eps=0.01).predict(preprocessed(model, pixels))
    assert want.shape == (3, 64, 64)
    # the served network runs channels-last: a near-zero input gradient may change sign (one pixel, one step)
    got = torch.tensor([r.scores["odin"] for r in results])
    torch.testing.assert_close(got, want.amax(dim=(1, 2)), rtol=1e-3, atol=1e-4)
    with pytest.raises(UnservableDetectorError, match="per-pixel"):
        build_detector(model, save_detector(GradNorm(None)))


def test_refusals_say_why(served: ServedModel, settings: Settings, library: dict[str, Detector]) -> None:
    with pytest.raises(UnservableDetectorError, match="vision-language"):
        build_detector(served, save_detector(MCM(None, torch.randn(6, 64))))
    demo = ServedModel(demo_model_configs()[0], settings)  # no nodes.layers
    for name in ("gram", "multi-maha", "nacue"):
        with pytest.raises(UnservableDetectorError, match="nodes.layers"):
            build_detector(demo, save_detector(library[name]))
    two_layers = Gram(None, None, 6).fit_features(
        [torch.rand(60, 16, 4, 4), torch.rand(60, 32, 2, 2)], torch.arange(60) % 6
    )
    with pytest.raises(ValueError, match="widths"):
        build_detector(served, save_detector(two_layers))


def test_over_http_scores_equal_the_library_and_metrics_show_the_cost(
    settings: Settings, served: ServedModel, library: dict[str, Detector]
) -> None:
    pngs = [digit_png(i) for i in range(4)] + [noise_png(i) for i in range(2)]
    pixels = [served.preprocessor.pixels(Image.open(io.BytesIO(png))) for png in pngs]
    x = preprocessed(served, pixels)
    base = "/v1/models/digits-layers"
    with serve(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        headers = {**AUTH, "Content-Type": "application/octet-stream"}
        for name, detector in library.items():
            response = client.put(f"{base}/detectors/{name}", content=save_detector(detector), headers=headers)
            assert response.status_code == 201, response.text
        refused = client.put(
            f"{base}/detectors/mcm", content=save_detector(MCM(None, torch.randn(6, 64))), headers=headers
        )
        assert refused.status_code == 422 and "vision-language" in refused.json()["detail"]
        listed = {d["name"]: d["input_kind"] for d in client.get(f"{base}/detectors").json()["detectors"]}
        assert listed["gradnorm"] == "input" and listed["gram"] == "multi_features"
        files = [("files", (f"{i}.png", png)) for i, png in enumerate(pngs)]
        response = client.post(f"{base}/score", files=files)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        metrics = client.get("/metrics").text
    counts = {
        (sample.labels["model"], sample.labels["detector"]): sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "ood_detector_compute_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    }
    for name, detector in library.items():
        got = torch.tensor([r["detectors"][name]["score"] for r in results])
        torch.testing.assert_close(got, detector.predict(x).float(), rtol=RTOL, atol=ATOL, msg=name)
        assert counts.get(("digits-layers", name), 0) >= 1, name


def test_the_layers_come_from_the_same_forward_as_the_other_outputs(served: ServedModel) -> None:
    """The multi-node config keeps the one-forward outputs: ``feature_maps`` and ``layers.2`` are one node."""
    probe: dict[str, Any] = served.probe
    assert {"logits", "features", "feature_maps", "layers.0", "layers.1", "layers.2"} <= set(probe)
    assert probe["layers.2"] is probe["feature_maps"] or torch.equal(probe["layers.2"], probe["feature_maps"])
    assert [served.dims[f"layers.{i}"] for i in range(3)] == [16, 32, 64]
