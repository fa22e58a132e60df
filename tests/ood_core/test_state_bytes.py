"""Saved states are byte-deterministic: two identical fits give the same file (so the same sha256), the header is
canonical (metadata keys sorted, JSON inside with sorted keys, padded to 8 bytes), and files written in another
order (by plain ``safetensors.torch.save``, as before) still load."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load, save

from ood_core.api import Detector
from ood_core.calibration import Calibration
from ood_core.detector import KNN, EnergyBased, Mahalanobis, ViM
from ood_core.fit_checkpoint import load_fit_checkpoint, save_fit_checkpoint
from ood_core.state import load_detector, save_detector
from ood_core.state_write import canonical_safetensors


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(24) % 3
    return torch.randn(24, 6, generator=g) + y[:, None].float(), y


def _vim() -> Detector:
    g = torch.Generator().manual_seed(4)
    return ViM(None, d=2, w=torch.randn(3, 6, generator=g), b=torch.randn(3, generator=g))


#: name -> a fresh detector (``-calibrated``: saved with a calibration of its scores)
CASES: dict[str, Callable[[], Detector]] = {
    "mahalanobis": lambda: Mahalanobis(None),
    "knn": lambda: KNN(None, k=3),
    "vim": _vim,
    "energy-calibrated": lambda: EnergyBased(None, t=2.0),
}


def _fit_and_save(name: str) -> bytes:
    x, y = _data()
    detector = CASES[name]()
    if detector.fit_passes:
        detector.fit_features(x, y)
    calibration = None
    if name.endswith("-calibrated"):
        calibration = Calibration.from_scores(detector.predict_features(x[:, :3]), target_tpr=0.9)  # 3 logits
    return save_detector(detector, calibration=calibration)


@pytest.mark.parametrize("name", list(CASES))
def test_identical_fits_give_identical_bytes(name: str) -> None:
    saved = [_fit_and_save(name) for _ in range(4)]
    assert len({hashlib.sha256(data).hexdigest() for data in saved}) == 1
    loaded = load_detector(saved[0])
    assert save_detector(loaded, calibration=loaded.calibration) == saved[0]  # a load / save round trip too


def _header(data: bytes) -> tuple[int, str]:
    size = int.from_bytes(data[:8], "little")
    return size, data[8 : 8 + size].decode("utf-8")


def test_the_header_is_canonical() -> None:
    data = _fit_and_save("energy-calibrated")
    size, text = _header(data)
    assert size % 8 == 0 and text == text.rstrip() + " " * (len(text) - len(text.rstrip()))
    header = json.loads(text)
    assert next(iter(header)) == "__metadata__"
    meta = header["__metadata__"]
    assert list(meta) == sorted(meta)
    for key in ("hparams", "calibration"):
        inner = json.loads(meta[key])
        assert list(inner) == sorted(inner), key
    offsets = [entry["data_offsets"] for key, entry in header.items() if key != "__metadata__"]
    assert offsets == sorted(offsets) and offsets[0][0] == 0 and offsets[-1][1] == len(data) - 8 - size


def test_canonical_bytes_hold_the_same_tensors_and_metadata_as_safetensors_writes() -> None:
    tensors = {"b": torch.arange(5, dtype=torch.int64), "a": torch.rand(2, 3), "c": torch.zeros(0), "d": torch.ones(3)}
    metadata = {f"k{i}": json.dumps({"z": i, "a": [i]}) for i in range(10)}
    data = canonical_safetensors(tensors, metadata)
    assert data == canonical_safetensors(dict(reversed(tensors.items())), dict(reversed(metadata.items())))
    plain = save(tensors, metadata=metadata)
    assert len(data) == len(plain) and data[-20:] == plain[-20:]  # same data region, same header length
    for name, tensor in load(data).items():
        assert torch.equal(tensor, tensors[name]), name
    assert json.loads(_header(data)[1])["__metadata__"] == metadata


def test_a_state_written_in_any_metadata_order_still_loads() -> None:
    """States written before the canonical header (safetensors' own, randomly ordered metadata) load the same."""
    data = _fit_and_save("mahalanobis")
    size, text = _header(data)
    meta = json.loads(text)["__metadata__"]
    old = save(load(data), metadata=dict(reversed(meta.items())))
    assert old != data
    x, _ = _data()
    assert torch.equal(load_detector(old).predict_features(x), load_detector(data).predict_features(x))
    assert save_detector(load_detector(old)) == data


def test_fit_checkpoints_are_byte_deterministic() -> None:
    x, y = _data()
    first, second = (save_fit_checkpoint(_vim().partial_fit_features(x, y), meta={"b": "1", "a": "2"}) for _ in "12")
    assert first == second
    resumed, meta = load_fit_checkpoint(first)
    assert isinstance(resumed, ViM) and meta == {"a": "2", "b": "1"}
