"""Small units without an app: preprocessing, the state store, thresholds and p-values, JSON logs, PNG maps."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ood_core.calibration import Calibration
from ood_core.detector import EnergyBased
from service.errors import DetectorNotFoundError, InvalidNameError
from service.logs import JsonFormatter, request_id_var
from service.preprocess import Preprocessor
from service.routes.segment import encode_map
from service.runtime import ActiveDetector
from service.scoring import ItemResult, ScoreItem, classification_verdicts, threshold_for
from service.settings import PreprocessConfig
from service.store import StateStore, StoredState, sha256_hex


def test_preprocessing_normalizes_hand_computed_values() -> None:
    pre = Preprocessor(PreprocessConfig(mode="L", mean=[0.5], std=[0.25]), (2, 2))
    pixels = pre.pixels(Image.fromarray(np.array([[0, 255], [51, 204]], dtype=np.uint8)))
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 2, 2)
    out = pre.normalize(pixels[None])
    # (x / 255 - 0.5) / 0.25: 0 -> -2, 255 -> 2, 51 -> -1.2, 204 -> 1.2
    assert torch.allclose(out[0, 0], torch.tensor([[-2.0, 2.0], [-1.2, 1.2]]), atol=1e-6)


def test_preprocessing_converts_resizes_and_crops() -> None:
    pre = Preprocessor(PreprocessConfig(mode="RGB", resize=(10, 12), crop=(4, 6)), (4, 6))
    gray = Image.fromarray(np.full((30, 7), 9, dtype=np.uint8))
    pixels = pre.pixels(gray)
    assert pixels.shape == (3, 4, 6) and int(pixels.min()) == int(pixels.max()) == 9
    stripes = np.zeros((10, 12), dtype=np.uint8)
    stripes[:, 3:9] = 200  # exactly the central 6 columns: the crop keeps only them
    assert (
        int(
            Preprocessor(PreprocessConfig(mode="L", resize=(10, 12), crop=(4, 6), mean=[0], std=[1]), (4, 6))
            .pixels(Image.fromarray(stripes))
            .min()
        )
        == 200
    )


def test_store_versions_sha_and_delete(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = store.put("m", "d", b"one", "EnergyBased")
    second = store.put("m", "d", b"two", "EnergyBased")
    third = store.put("m", "d", b"three", "EnergyBased")
    assert (first.version, second.version, third.version) == (1, 2, 3)
    assert sorted(p.name for p in (tmp_path / "m" / "d").glob("v*")) == ["v2.safetensors", "v3.safetensors"]
    info, data = store.read("m", "d")
    assert data == b"three" and info.sha256 == sha256_hex(b"three") and info.size_bytes == 5
    assert [s.name for s in store.list_states("m")] == ["d"]
    (tmp_path / "m" / "d" / "v3.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        store.read("m", "d")
    store.delete("m", "d")
    assert store.list_states("m") == [] and not (tmp_path / "m" / "d").exists()
    with pytest.raises(DetectorNotFoundError):
        store.delete("m", "d")
    with pytest.raises(InvalidNameError):
        store.put("m", "../escape", b"x", "EnergyBased")


def test_threshold_and_conformal_p_values() -> None:
    detector = EnergyBased()
    detector.calibration = Calibration(torch.tensor([1.0, 2.0, 3.0, 4.0]), target_tpr=0.75)
    stored = StoredState("m", "e", 1, "0" * 64, 1, "EnergyBased", "2026-01-01T00:00:00Z")
    active = ActiveDetector("e", detector, stored)
    assert threshold_for(active, None, None) == 3.0  # smallest t with #{s <= t} / 4 >= 0.75
    assert threshold_for(active, None, 0.5) == 2.0
    assert threshold_for(active, 7.5, 0.5) == 7.5
    is_ood, p_values = _verdicts(active, torch.tensor([2.5, 3.0, 9.0], dtype=torch.float64), 3.0)
    assert is_ood == [False, False, True]
    # (1 + #{calibration >= s}) / (n + 1): 2.5 -> 3/5, 3.0 -> 3/5, 9.0 -> 1/5
    assert p_values == pytest.approx([0.6, 0.6, 0.2])
    detector.calibration = None
    assert threshold_for(active, None, None) is None
    assert _verdicts(active, torch.tensor([1.0]), None) == ([None], [None])


def _verdicts(active: ActiveDetector, scores: torch.Tensor, threshold: float | None) -> tuple[list, list]:  # type: ignore[type-arg]
    """``is_ood`` and ``p_value`` of each score, through the batch worker's vectorized verdicts."""
    items = [ScoreItem(torch.zeros(1), (active,), threshold=threshold) for _ in range(len(scores))]
    results = [ItemResult() for _ in items]
    classification_verdicts(active, items, results, scores)
    entries = [result.verdicts[active.name] for result in results]
    return [e["is_ood"] for e in entries], [e["p_value"] for e in entries]


def test_json_log_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("service.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.model = "digits"
    token = request_id_var.set("rid-1")
    try:
        entry = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert entry["message"] == "hello you" and entry["request_id"] == "rid-1" and entry["model"] == "digits"
    assert entry["level"] == "INFO" and entry["time"].endswith("Z")


def test_png_map_round_trips_within_one_level() -> None:
    scores = torch.tensor([[-3.0, 0.0], [1.5, 7.0]])
    encoded = encode_map(scores, "png")
    image = Image.open(io.BytesIO(base64.b64decode(encoded["data"])))
    levels = np.asarray(image).astype(np.float64)
    assert levels.min() == 0 and levels.max() == 65535
    restored = encoded["min"] + levels / 65535 * (encoded["max"] - encoded["min"])
    assert np.abs(restored - scores.numpy()).max() <= 10.0 / 65535


def test_multipart_parser_reads_files_and_fields_like_httpx_encodes_them() -> None:
    import httpx

    from service.multipart import parse_multipart

    request = httpx.Request(
        "POST",
        "http://x/",
        files=[("files", ("a.png", b"\r\n--not-the-boundary\r\n\x00bin")), ("files", ("b.png", b""))],
        data={"labels": "1,2", "detector_class": "KNN"},
    )
    body = request.read()
    parts = parse_multipart(body, request.headers["content-type"])
    assert [(p.name, p.filename, p.data) for p in parts if p.is_file] == [
        ("files", "a.png", b"\r\n--not-the-boundary\r\n\x00bin"),
        ("files", "b.png", b""),
    ]
    assert {p.name: p.data for p in parts if not p.is_file} == {"labels": b"1,2", "detector_class": b"KNN"}


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx', 'multipart/form-data; boundary="b"', "truncated"),
        (
            b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--",
            "multipart/form-data; boundary=b",
            "Content-Disposition",
        ),
        (b"no parts", "multipart/form-data; boundary=b", "no part"),
        (b"", "multipart/form-data", "boundary"),
    ],
)
def test_multipart_parser_rejects_malformed_bodies(body: bytes, content_type: str, message: str) -> None:
    from service.errors import BadRequestError
    from service.multipart import parse_multipart

    with pytest.raises(BadRequestError, match=message):
        parse_multipart(body, content_type)


def test_maps_with_non_finite_scores_stay_valid_json() -> None:
    scores = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]])
    assert encode_map(scores, "json")["data"] == [[1.0, None], [None, 3.0]]
    encoded = encode_map(scores, "png")
    assert (encoded["min"], encoded["max"]) == (1.0, 3.0)
    json.dumps(encoded, allow_nan=False)
