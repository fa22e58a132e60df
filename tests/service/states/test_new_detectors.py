"""The detectors added from pytorch-ood 0.4.0 that need one forward (fDBD, GMM, LTS, NCI, NNGuide, PNML, RankFeat,
VRA) served on the demo classifier: fitted through the service's fit path (``fit_state``), validated and loaded by
its build path (``build_detector``: dimensions, heads, smoke test), they score exactly like the same detector fitted
and run by the library on the zoo network (``fit(loader)`` / ``predict(x)`` through ``encoder``/``backbone`` and
``head``) on the same preprocessed inputs, in-process and over real HTTP."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

import ood_core.detector as detectors
from ood_core.api import Detector
from ood_core.data import load_split
from ood_core.state import load_detector
from ood_core.zoo import DigitsCNN, load_classifier
from service.demo import demo_model_configs
from service.engine.served_model import ServedModel
from service.settings import Settings, load_settings
from service.states.fitting import fit_state
from service.states.validate import build_detector
from tests.service.conftest import API_KEY, AUTH, digit_png, noise_png, serve

pytestmark = pytest.mark.timeout(180)

#: (state name, class, hyperparameters) served on the demo classifier
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("fdbd", "fDBD", {}),
    ("gmm", "GMM", {"reg": 1e-3}),
    ("lts", "LTS", {"p": 0.1}),
    ("nci", "NCI", {"alpha": 0.01}),
    ("nnguide", "NNGuide", {"k": 5}),
    ("pnml", "PNML", {}),
    ("rankfeat", "RankFeat", {}),
    ("vra", "VRA", {"lower_percentile": 0.05, "upper_percentile": 0.95}),
]
RTOL = ATOL = 1e-5


def library_detector(cls: type[Detector], net: DigitsCNN, hparams: dict[str, Any]) -> Detector:
    """The detector wired to the zoo network itself (not to the service's feature extractor)."""
    if cls.input_kind == "feature_maps":
        return cls(net.body, net.head_from_maps, **hparams)  # type: ignore[call-arg]
    encoder = nn.Sequential(net.body, net.pool)
    if "head" in cls.external_modules:
        return cls(encoder, net.fc, **hparams)  # type: ignore[call-arg]
    return cls(encoder, **hparams)  # type: ignore[call-arg]


def networks_of(cls: type[Detector], net: DigitsCNN) -> dict[str, Callable[[Tensor], Tensor]]:
    """The networks to pass to ``load_detector`` for ``cls`` (the zoo network's parts)."""
    if cls.input_kind == "feature_maps":
        return {"backbone": net.body, "head": net.head_from_maps}
    nets: dict[str, Callable[[Tensor], Tensor]] = {"encoder": nn.Sequential(net.body, net.pool)}
    if "head" in cls.external_modules:
        nets["head"] = net.fc
    return nets


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(state_dir=tmp_path_factory.mktemp("new-detectors"), api_keys=API_KEY)


@pytest.fixture(scope="module")
def served(settings: Settings) -> ServedModel:
    return ServedModel(demo_model_configs()[0], settings)


@pytest.fixture(scope="module")
def net() -> DigitsCNN:
    return load_classifier(device="cpu")


@pytest.fixture(scope="module")
def inputs(served: ServedModel) -> dict[str, Any]:
    """Pixels (uint8, as decoded) and the preprocessed inputs of the fit, calibration and test images."""
    fit_x, fit_y = load_split("train")
    cal_x, _ = load_split("calibration")
    test_x = torch.cat([load_split("test")[0][:20], load_split("near_ood")[0][:10], load_split("uniform")[0][:10]])
    out: dict[str, Any] = {"fit_y": fit_y}
    for key, images in (("fit", fit_x), ("cal", cal_x), ("test", test_x)):
        pixels = served.preprocessor.pixels_from_tensor(images)
        out[f"{key}_pixels"] = pixels
        out[f"{key}_x"] = served.preprocessor.normalize(torch.stack(pixels))
    return out


@pytest.fixture(scope="module")
def states(served: ServedModel, inputs: dict[str, Any]) -> dict[str, bytes]:
    """Every case fitted and calibrated through the service's fit path."""
    fit_outputs = served.forward_chunks(inputs["fit_pixels"])
    cal_outputs = served.forward_chunks(inputs["cal_pixels"])
    return {
        name: fit_state(served, cls, hparams, fit_outputs, inputs["fit_y"], cal_outputs) for name, cls, hparams in CASES
    }


@pytest.fixture(scope="module")
def library_scores(net: DigitsCNN, inputs: dict[str, Any]) -> dict[str, Tensor]:
    """Every case fitted and run by the library alone, on the zoo network, from the preprocessed inputs."""
    x, y = inputs["fit_x"], inputs["fit_y"]
    loader = [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(y), 100)]
    scores = {}
    for name, cls_name, hparams in CASES:
        detector = library_detector(getattr(detectors, cls_name), net, hparams).fit(loader)
        scores[name] = detector.predict(inputs["test_x"])
    return scores


@pytest.mark.parametrize(("name", "cls_name", "hparams"), CASES, ids=[c[0] for c in CASES])
def test_built_detector_scores_like_the_library(
    name: str,
    cls_name: str,
    hparams: dict[str, Any],
    served: ServedModel,
    net: DigitsCNN,
    inputs: dict[str, Any],
    states: dict[str, bytes],
    library_scores: dict[str, Tensor],
) -> None:
    detector = build_detector(served, states[name])
    assert type(detector).__name__ == cls_name and {k: detector.hparams()[k] for k in hparams} == hparams
    outputs = served.forward(inputs["test_pixels"])
    with torch.no_grad():
        got = detector.predict_features(outputs[detector.input_kind]).float().cpu()
    torch.testing.assert_close(got, library_scores[name], rtol=RTOL, atol=ATOL)
    # the saved state, loaded by the library with the zoo network's parts, scores the same too
    cls = getattr(detectors, cls_name)
    reloaded = load_detector(states[name], **networks_of(cls, net))
    torch.testing.assert_close(reloaded.predict(inputs["test_x"]), library_scores[name], rtol=RTOL, atol=ATOL)
    assert reloaded.calibration is not None  # fit_state calibrated it on the held-out ID images


def test_uploaded_states_score_like_the_library_over_http(
    settings: Settings, served: ServedModel, net: DigitsCNN, states: dict[str, bytes], inputs: dict[str, Any]
) -> None:
    pngs = [digit_png(i) for i in range(6)] + [noise_png(i) for i in range(3)]
    pixels = [served.preprocessor.pixels(Image.open(io.BytesIO(png))) for png in pngs]
    x = served.preprocessor.normalize(torch.stack(pixels))
    x_fit, y_fit = inputs["fit_x"], inputs["fit_y"]
    with serve(settings) as url:
        headers = {**AUTH, "Content-Type": "application/octet-stream"}
        for name, _, _ in CASES:
            response = httpx.put(f"{url}/v1/models/digits/detectors/{name}", content=states[name], headers=headers)
            assert response.status_code == 201, response.text
        files = [("files", (f"{i}.png", png)) for i, png in enumerate(pngs)]
        names = ",".join(name for name, _, _ in CASES)
        response = httpx.post(f"{url}/v1/models/digits/score?detectors={names}", files=files, timeout=60)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
    for name, cls_name, hparams in CASES:
        library = library_detector(getattr(detectors, cls_name), net, hparams).fit([(x_fit, y_fit)])
        want = library.predict(x)
        got = torch.tensor([r["detectors"][name]["score"] for r in results])
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"{name}: served over HTTP vs library")
