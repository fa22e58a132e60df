"""Bad saved states raise InvalidStateError (checked with a fitted Mahalanobis detector)."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from ood_core.api import InvalidStateError, RequiresFitException
from ood_core.detector import Mahalanobis
from ood_core.state import load_detector, read_state_info, save_detector

Tensors = dict[str, torch.Tensor]
Meta = dict[str, str]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Tensors, Meta]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(12) % 3
    det = Mahalanobis(None).fit_features(torch.randn(12, 4, generator=g) + y[:, None].float(), y)
    path = tmp_path / "maha.safetensors"
    save_detector(det, path)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    return load(path.read_bytes()), meta


def rebuilt(saved: tuple[Tensors, Meta], edit: Callable[[Tensors, Meta], None]) -> bytes:
    tensors, meta = {k: v.clone() for k, v in saved[0].items()}, dict(saved[1])
    edit(tensors, meta)
    return save(tensors, metadata=meta)


def test_unmodified_state_loads(saved: tuple[Tensors, Meta]) -> None:
    det = load_detector(rebuilt(saved, lambda t, m: None))
    assert isinstance(det, Mahalanobis) and det.num_classes == 3 and det.calibration is None


def set_tensor(name: str, value: torch.Tensor) -> Callable[[Tensors, Meta], None]:
    return lambda t, m: t.__setitem__(name, value)


def nan_precision(t: Tensors, m: Meta) -> None:
    t["precision"][1, 2] = float("nan")


def inf_mu(t: Tensors, m: Meta) -> None:
    t["mu"][0, 0] = float("inf")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_tensor("mu", torch.zeros(3, 5, dtype=torch.float64)), "size 5 on axis 1"),  # D from metadata is 4
        (set_tensor("mu", torch.zeros(2, 4, dtype=torch.float64)), "size 2 on axis 0"),  # C from metadata is 3
        (set_tensor("precision", torch.zeros(4, 4, 1, dtype=torch.float64)), "dims"),
        (set_tensor("mu", torch.zeros(3, 4, dtype=torch.float32)), "dtype"),
        (set_tensor("extra", torch.zeros(1)), "unexpected"),
        (lambda t, m: t.pop("precision"), "missing"),
        (nan_precision, "NaN or Inf"),
        (inf_mu, "NaN or Inf"),
        (lambda t, m: m.__setitem__("class", "KNN"), "missing|unexpected"),
        (lambda t, m: m.__setitem__("class", "NoSuchDetector"), "unknown detector"),
        (lambda t, m: m.__setitem__("hparams", "{not json"), "not valid JSON"),
        (lambda t, m: m.__setitem__("hparams", json.dumps({"bogus": 1})), "hyperparameters"),
        (lambda t, m: m.__setitem__("hparams", '{"eps": NaN, "norm_std": null}'), "non-finite"),
        (lambda t, m: m.__setitem__("hparams", '{"eps": Infinity, "norm_std": null}'), "non-finite"),
        (lambda t, m: m.__setitem__("num_classes", "4"), "num_classes|size 3"),
        (lambda t, m: m.__setitem__("format", "something-else"), "format"),
        (lambda t, m: m.pop("library_version"), "library_version"),
        (lambda t, m: m.__setitem__("library_version", "not a version"), "library_version"),
        (lambda t, m: m.__setitem__("input_kind", "logits"), "input_kind"),
    ],
)
def test_bad_states_are_rejected(
    saved: tuple[Tensors, Meta], edit: Callable[[Tensors, Meta], None], message: str
) -> None:
    with pytest.raises(InvalidStateError, match=message):
        load_detector(rebuilt(saved, edit))


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_truncated_files_are_rejected(saved: tuple[Tensors, Meta], tmp_path: Path, keep: int) -> None:
    data = rebuilt(saved, lambda t, m: None)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(InvalidStateError):
        load_detector(path)
    with pytest.raises(InvalidStateError):
        read_state_info(path)


def test_missing_file_is_an_invalid_state(tmp_path: Path) -> None:
    with pytest.raises(InvalidStateError, match="cannot read"):
        load_detector(tmp_path / "absent.safetensors")


def test_unfitted_detector_cannot_be_saved(tmp_path: Path) -> None:
    with pytest.raises(RequiresFitException):
        save_detector(Mahalanobis(None), tmp_path / "unfitted.safetensors")
    assert not (tmp_path / "unfitted.safetensors").exists()
