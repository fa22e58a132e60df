"""Fit checkpoints: a fit saved mid-stream (in either pass) and resumed gives exactly the state of an
uninterrupted fit; damaged or mismatched checkpoints are refused with InvalidStateError."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save
from torch import Tensor

from ood_core.api import Detector, InvalidStateError
from ood_core.detector import EnergyBased, Mahalanobis
from ood_core.fit_checkpoint import load_fit_checkpoint, save_fit_checkpoint
from ood_core.state_io import read_source, tensor_digest

from .fit_cases import CASES, N, assert_same_state, batches

EXACT = (0.0, 0.0)
MODULES = {"SHE": "head", "ReAct": "head"}


def resume(det: Detector, data: bytes | Path, name: str, fit_pass: int) -> Detector:
    extra = {MODULES[name]: getattr(det, MODULES[name])} if name in MODULES else {}
    loaded, meta = load_fit_checkpoint(data, None, **extra)
    assert type(loaded) is type(det) and loaded.fit_pass == fit_pass and meta == {"step": "3"}
    assert not loaded.is_fitted
    return loaded


#: every detector stopped in its first pass, and the two-pass ones also in their second
STOPS = [(name, 0) for name in sorted(CASES)] + [(n, 1) for n in sorted(CASES) if CASES[n].make().fit_passes > 1]


@pytest.mark.parametrize(("name", "stop_in_pass"), STOPS)
def test_checkpoint_and_resume_equals_an_uninterrupted_fit(name: str, stop_in_pass: int, tmp_path: Path) -> None:
    case = CASES[name]
    z, y = case.data()
    pieces = batches(z, y, [0, 30, 31, 90, N])
    uninterrupted = case.make()
    while True:  # the same batches, one after the other
        for zb, yb in pieces:
            uninterrupted.partial_fit_features(zb, yb)
        if uninterrupted.finish_pass():
            break
    det = case.make()
    for _ in range(stop_in_pass):
        for zb, yb in pieces:
            det.partial_fit_features(zb, yb)
        assert not det.finish_pass()
    for zb, yb in pieces[:2]:
        det.partial_fit_features(zb, yb)
    path = tmp_path / "fit.ckpt.safetensors"
    data = save_fit_checkpoint(det, path, meta={"step": "3"})
    assert path.read_bytes() == data
    for source in (data, path):
        det = resume(uninterrupted, source, name, stop_in_pass)
        for p in range(stop_in_pass, det.fit_passes):
            for zb, yb in pieces[2:] if p == stop_in_pass else pieces:
                det.partial_fit_features(zb, yb)
            assert det.finish_pass() == (p == det.fit_passes - 1)
        assert_same_state(det, uninterrupted, EXACT)


def _tampered(data: bytes, edit: Callable[[dict[str, str], dict[str, Tensor]], None], digest: bool = True) -> bytes:
    header, tensors = read_source(data, with_tensors=True)
    meta = dict(header.metadata)
    edit(meta, tensors)
    if digest:
        meta["tensor_sha256"] = tensor_digest(tensors)
    return st_save(tensors, metadata=meta)


def _set(key: str, value: str) -> Callable[[dict[str, str], dict[str, Tensor]], None]:
    return lambda meta, tensors: meta.__setitem__(key, value)


def _fill(name: str, value: float) -> Callable[[dict[str, str], dict[str, Tensor]], None]:
    def edit(meta: dict[str, str], tensors: dict[str, Tensor]) -> None:
        tensors[name].fill_(value)

    return edit


def _replace(name: str, t: Tensor) -> Callable[[dict[str, str], dict[str, Tensor]], None]:
    return lambda meta, tensors: tensors.__setitem__(name, t)


BAD = {
    "format": (_set("format", "ood-serve/detector-state"), "not an ood-serve fit checkpoint"),
    "version": (_set("format_version", "9"), "unsupported fit checkpoint version"),
    "class": (_set("class", "Nope"), "unknown detector class"),
    "hparams": (_set("hparams", "[1, 2"), "'hparams' is not valid JSON"),
    "hparams_nan": (_set("hparams", '{"eps": NaN, "norm_std": null}'), "non-finite"),
    "bad_hparams": (
        _set("hparams", '{"eps": -1.0, "norm_std": null}'),
        "cannot resume the Mahalanobis fit from the checkpoint: eps",
    ),
    "network_hparams": (_set("hparams", '{"model": "x"}'), "must not set the networks"),
    "pass": (_set("fit_pass", "1"), "1 fit passes, not a pass 1"),
    "passes": (_set("fit_passes", "2"), "has 2 passes"),
    "user_meta": (_set("user_meta", '{"a": 1}'), "user_meta"),
    "nan": (_fill("stats.gram", float("nan")), "contains NaN or Inf"),
    "prefix": (_replace("extra", torch.zeros(2)), "no known prefix"),
    "shape": (_replace("stats.sums", torch.zeros(2, 3, dtype=torch.float64)), "cannot resume the Mahalanobis fit"),
    "counts": (_fill("stats.counts", -1.0), "non-negative whole numbers"),
    "state_dtype": (_replace("state.mu", torch.zeros(2, 6)), "state tensor 'mu' must be torch.float64"),
    "state_name": (_replace("state.nope", torch.zeros(2)), "has no state tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_are_refused(case: str) -> None:
    z, y = CASES["Mahalanobis"].data()
    det = Mahalanobis(None, eps=0.0).partial_fit_features(z, y)
    good = save_fit_checkpoint(det, meta={"step": "3"})
    load_fit_checkpoint(good)  # the untampered one loads
    edit, reason = BAD[case]
    with pytest.raises(InvalidStateError, match=reason):
        load_fit_checkpoint(_tampered(good, edit))


def test_damaged_bytes_are_refused() -> None:
    z, y = CASES["Mahalanobis"].data()
    good = save_fit_checkpoint(Mahalanobis(None).partial_fit_features(z, y))
    with pytest.raises(InvalidStateError, match="digest mismatch"):
        load_fit_checkpoint(_tampered(good, _fill("stats.sums", 1.0), digest=False))
    with pytest.raises(InvalidStateError, match="truncated"):
        load_fit_checkpoint(good[:-5])
    with pytest.raises(InvalidStateError, match="header length"):
        load_fit_checkpoint(b"\xff" * 64)
    huge = json.dumps({"__metadata__": {"format": "x" * (2 << 20)}}).encode()
    with pytest.raises(InvalidStateError, match="MAX_HEADER_BYTES"):
        load_fit_checkpoint(len(huge).to_bytes(8, "little") + huge)


def test_what_cannot_be_checkpointed_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs no fit"):
        save_fit_checkpoint(EnergyBased(None), tmp_path / "x")
    with pytest.raises(ValueError, match="meta must"):
        save_fit_checkpoint(Mahalanobis(None), tmp_path / "x", meta={"step": 3})  # type: ignore[dict-item]
    assert not (tmp_path / "x").exists()
    # an empty fit (nothing folded in yet) checkpoints and resumes
    det, meta = load_fit_checkpoint(save_fit_checkpoint(Mahalanobis(None)))
    z, y = CASES["Mahalanobis"].data()
    assert_same_state(det.partial_fit_features(z, y).fit_features(z, y), Mahalanobis(None).fit_features(z, y), EXACT)
    assert meta == {}
