"""The per-request path: verdicts computed per batch in the worker (mixing requests with different thresholds),
and small images decoded on the event loop vs. large ones in the thread pool."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ood_core.calibration import Calibration
from ood_core.detector import EnergyBased
from service.engine import submit
from service.engine.active import ActiveDetector, StoredState
from service.engine.devices import Staged
from service.engine.items import ScoreItem
from service.engine.scoring import process_batch
from service.engine.verdicts import threshold_for
from service.settings import Settings
from tests.service.conftest import AppRunner, digit_png, noise_png

pytestmark = pytest.mark.timeout(120)


class TwoLogitModel:
    """Stand-in for a served classifier: pixel value ``v`` -> logits ``(v / 50, 0)``."""

    task = "classification"
    thread_plan = None

    def stage(self, pixels: list[torch.Tensor]) -> Staged:
        return Staged(torch.stack(pixels), len(pixels))

    def forward_staged(self, staged: Staged) -> dict[str, torch.Tensor]:
        x = staged.batch.float().reshape(len(staged.batch), -1)[:, :1] / 50.0
        return {"logits": torch.cat([x, torch.zeros_like(x)], dim=1)}


def active(name: str, calibrated: bool) -> ActiveDetector:
    detector = EnergyBased()
    if calibrated:
        detector.calibration = Calibration(torch.linspace(-4.0, 0.0, 9, dtype=torch.float64), target_tpr=0.75)
    return ActiveDetector(name, detector, StoredState("m", name, 3, "0" * 64, 1, "EnergyBased", "2026-01-01T00:00:00Z"))


def pixel(value: int) -> torch.Tensor:
    return torch.full((1, 2, 2), value, dtype=torch.uint8)


def test_one_batch_gives_every_request_its_own_threshold_and_the_per_image_verdicts() -> None:
    cal, plain = active("cal", True), active("plain", False)
    items = [
        ScoreItem(pixel(0), (cal, plain)),  # defaults: calibration's threshold; no verdict for `plain`
        ScoreItem(pixel(200), (cal,), threshold=-1.5),  # ?threshold=
        ScoreItem(pixel(90), (plain, cal), tpr=0.25),  # ?tpr=
        ScoreItem(pixel(250), (plain,), threshold=-6.0),  # ?threshold= gives `plain` a verdict, no p-value
    ]
    model: Any = TwoLogitModel()
    batched = process_batch(model, items)
    for item, result in zip(items, batched, strict=True):
        assert set(result.verdicts) == {a.name for a in item.detectors}
        alone = process_batch(model, [item])[0]  # the same image in a batch of its own
        for detector in item.detectors:
            got = result.verdicts[detector.name]
            score = torch.tensor([got["score"]], dtype=torch.float64)
            used = threshold_for(detector, item.threshold, item.tpr)
            # the per-request reference: the score against its threshold and the calibration, one at a time
            is_ood = None if used is None else score > used
            calibration = detector.detector.calibration
            p_values = None if calibration is None else calibration.p_values(score)
            assert got["score"] == pytest.approx(alone.verdicts[detector.name]["score"], abs=1e-6)
            assert got["threshold"] == used and got["version"] == 3
            assert got["is_ood"] == (None if is_ood is None else bool(is_ood[0]))
            assert got["p_value"] == (None if p_values is None else pytest.approx(float(p_values[0])))
    assert batched[0].verdicts["cal"]["threshold"] == pytest.approx(-1.0)  # 75% of 9 calibration scores
    assert batched[2].verdicts["cal"]["threshold"] == pytest.approx(-3.0)  # ?tpr=0.25: the 3rd of 9
    assert batched[0].verdicts["plain"] == {
        "score": pytest.approx(batched[0].scores["plain"]),
        "threshold": None,
        "is_ood": None,
        "p_value": None,
        "version": 3,
    }
    assert batched[0].verdicts["cal"]["is_ood"] is True and batched[1].verdicts["cal"]["is_ood"] is False
    assert batched[3].verdicts["plain"]["is_ood"] is True and batched[3].verdicts["plain"]["p_value"] is None


@pytest.fixture
def app(make_settings: Callable[..., Settings]) -> Iterator[AppRunner]:
    runner = AppRunner(make_settings())
    yield runner
    runner.close()


def test_small_images_decode_on_the_loop_large_ones_in_the_pool_with_the_same_answers(
    app: AppRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    pooled: list[int] = []
    real = submit._decode_all

    def counting(model: Any, raws: list[Any], *args: Any) -> Any:
        if threading.current_thread().name.startswith("asyncio"):  # the event loop's default thread pool
            pooled.append(len(raws))
        return real(model, raws, *args)

    monkeypatch.setattr(submit, "_decode_all", counting)
    files = [("files", (f"{i}.png", digit_png(i))) for i in range(2)]
    inline = app.post("/v1/models/digits/score", files=files)
    assert inline.status_code == 200 and pooled == []  # 2 x (32x32 + 32x32) pixels: on the loop
    monkeypatch.setattr(submit, "INLINE_DECODE_PIXELS", 0)
    in_pool = app.post("/v1/models/digits/score", files=files)
    assert in_pool.status_code == 200 and pooled == [2]
    assert in_pool.json() == inline.json()
    monkeypatch.setattr(submit, "INLINE_DECODE_PIXELS", 8192)
    assert app.post("/v1/models/digits/score", files=[("files", ("big.png", noise_png(1, 128)))]).status_code == 200
    assert pooled == [2, 1]  # 128x128 is over the pixel budget
    big = noise_png(2, 300)
    assert len(big) > submit.INLINE_DECODE_BYTES  # not even its header is read on the loop
    assert app.post("/v1/models/digits/score", files=[("files", ("big.png", big))]).status_code == 200
    assert pooled == [2, 1, 1]


def test_concurrent_requests_with_different_thresholds_each_get_their_own(app: AppRunner) -> None:
    png = noise_png(4)
    url = "/v1/models/digits/score?detectors=energy,knn"
    queries = [f"&threshold={t}" for t in (-50.0, 0.0, 50.0)] + ["&tpr=0.5", ""] * 3

    async def burst() -> list[dict[str, Any]]:
        responses = await asyncio.gather(*(app.client.post(url + q, files=[("files", ("n", png))]) for q in queries))
        return [r.json()["results"][0]["detectors"] for r in responses]

    answers = app.call(burst())
    default = app.post(url, files=[("files", ("n", png))]).json()["results"][0]["detectors"]
    half = app.post(url + "&tpr=0.5", files=[("files", ("n", png))]).json()["results"][0]["detectors"]
    for query, detectors in zip(queries, answers, strict=True):
        for name, verdict in detectors.items():
            assert verdict["score"] == pytest.approx(default[name]["score"], rel=1e-5)
            assert verdict["p_value"] == pytest.approx(default[name]["p_value"])
            if query.startswith("&threshold="):
                assert verdict["threshold"] == float(query.split("=")[1])
            else:
                assert verdict["threshold"] == (half if query else default)[name]["threshold"]
            assert verdict["is_ood"] == (verdict["score"] > verdict["threshold"])
    assert [list(d) for d in answers] == [["energy", "knn"]] * len(queries)
