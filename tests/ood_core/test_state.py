"""Bad saved states raise InvalidStateError (checked with a fitted Mahalanobis detector)."""

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ood_core.api import InvalidStateError, RequiresFitException
from ood_core.detector import Mahalanobis
from ood_core.state import FORMAT_VERSION, load_detector, read_state_info, save_detector
from ood_core.state_io import tensor_digest

from .state_helpers import Meta, Tensors, resave, split_state


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Tensors, Meta]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(12) % 3
    det = Mahalanobis(None).fit_features(torch.randn(12, 4, generator=g) + y[:, None].float(), y)
    path = tmp_path / "maha.safetensors"
    save_detector(det, path)
    return split_state(path.read_bytes())


def rebuilt(saved: tuple[Tensors, Meta], edit: Callable[[Tensors, Meta], None], digest: bool = True) -> bytes:
    """The saved state after ``edit``, its digest recomputed (unless ``digest=False``)."""
    tensors, meta = {k: v.clone() for k, v in saved[0].items()}, dict(saved[1])
    edit(tensors, meta)
    return resave(tensors, meta, digest=digest)


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
        (lambda t, m: m.__setitem__("hparams", '{"eps": 1e999, "norm_std": null}'), "non-finite number 1e999"),
        (lambda t, m: m.__setitem__("hparams", '{"eps": 0.1, "norm_std": [1.0, -1e400]}'), "non-finite"),
        (lambda t, m: m.__setitem__("hparams", '{"eps": 0.1, "norm_std": [[[{"a": 2e308}]]]}'), "non-finite"),
        (lambda t, m: m.__setitem__("hparams", "[" * 100_000), "not valid JSON"),
        (lambda t, m: m.__setitem__("hparams", '{"eps": ' + "9" * 5000 + "}"), "not valid JSON"),
        (lambda t, m: m.__setitem__("hparams", '{"eps": 0.1, "model": "x"}'), "must not set the networks model"),
        (lambda t, m: m.__setitem__("hparams", '{"eps": "' + "x" * 100_000 + '"}'), "hyperparameters"),
        (lambda t, m: m.__setitem__("feature_dim", "1e999"), "non-finite"),
        (lambda t, m: m.__setitem__("calibration", '{"n": 3, "target_tpr": 1e999}'), "non-finite"),
        (lambda t, m: m.__setitem__("num_classes", "4"), "num_classes|size 3"),
        (lambda t, m: m.__setitem__("format", "something-else"), "format"),
        (lambda t, m: m.pop("library_version"), "library_version"),
        (lambda t, m: m.__setitem__("library_version", "not a version"), "library_version"),
        (lambda t, m: m.__setitem__("library_version", "1" + "a" * 40 + "!"), "library_version"),  # no ReDoS
        (lambda t, m: m.__setitem__("library_version", "1" * 65), "library_version"),
        (lambda t, m: m.__setitem__("format_version", "3"), "unsupported state format version '3'"),
        (lambda t, m: t.__setitem__("calibration.extra", torch.zeros(1)), "unexpected tensors: calibration.extra"),
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


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_saved_state_is_version_2_with_the_tensor_digest(saved: tuple[Tensors, Meta]) -> None:
    tensors, meta = saved
    assert meta["format_version"] == FORMAT_VERSION == "2"
    assert meta["tensor_sha256"] == tensor_digest(tensors) and len(meta["tensor_sha256"]) == 64


def test_digest_follows_its_definition() -> None:
    tensors = {
        "b": torch.tensor([[1.5, -2.0]], dtype=torch.float64),
        "a": torch.tensor(3, dtype=torch.int64),
        "c": torch.zeros(0, 2, dtype=torch.bfloat16),
        "d": torch.tensor([True, False]),
    }
    h = hashlib.sha256()
    u64 = struct.Struct("<Q").pack
    for name, code in (("a", b"I64"), ("b", b"F64"), ("c", b"BF16"), ("d", b"BOOL")):
        t = tensors[name]
        raw = t.numpy().tobytes() if t.dtype != torch.bfloat16 else b""
        h.update(u64(len(name)) + name.encode() + u64(len(code)) + code + u64(t.dim()))
        h.update(b"".join(u64(s) for s in t.shape) + u64(len(raw)) + raw)
    assert tensor_digest(tensors) == h.hexdigest()
    assert tensor_digest({"b": tensors["b"].T.contiguous().T}) == tensor_digest({"b": tensors["b"]})


def test_a_changed_tensor_fails_the_digest(saved: tuple[Tensors, Meta]) -> None:
    def nudge(t: Tensors, m: Meta) -> None:
        t["mu"][0, 0] += 1e-9  # harmless to every other check

    with pytest.raises(InvalidStateError, match=r"tensor digest mismatch: the file is corrupted"):
        load_detector(rebuilt(saved, nudge, digest=False))
    load_detector(rebuilt(saved, nudge))  # the same values with a matching digest load


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, m: m.pop("tensor_sha256"), "lacks 'tensor_sha256'"),
        (lambda t, m: m.__setitem__("tensor_sha256", "ABC"), "64 lowercase hexadecimal"),
        (lambda t, m: m.__setitem__("tensor_sha256", "0" * 64), "tensor digest mismatch"),
        (lambda t, m: m.__setitem__("format_version", "1") or m.__setitem__("tensor_sha256", "0" * 64), "mismatch"),
    ],
)
def test_digest_field_is_required_and_checked(
    saved: tuple[Tensors, Meta], edit: Callable[[Tensors, Meta], None], message: str
) -> None:
    with pytest.raises(InvalidStateError, match=message):
        load_detector(rebuilt(saved, edit, digest=False))


def test_version_1_states_without_digest_still_load(saved: tuple[Tensors, Meta]) -> None:
    def as_version_1(t: Tensors, m: Meta) -> None:
        m["format_version"] = "1"
        del m["tensor_sha256"]

    assert isinstance(load_detector(rebuilt(saved, as_version_1)), Mahalanobis)
    # a file written by the version-1 code (before the digest), loading as the same detector
    path = FIXTURES / "mahalanobis_v1.safetensors"
    assert '"format_version":"1"' in path.read_bytes()[:2000].decode("utf-8", "replace")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(30) % 3
    x = torch.randn(30, 4, generator=g) + y[:, None].float()
    expected = Mahalanobis(None).fit_features(x, y)
    for source in (path, path.read_bytes()):
        loaded = load_detector(source)
        assert loaded.calibration is not None and loaded.calibration.n == 40
        query = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(loaded.predict_features(query), expected.predict_features(query), rtol=0, atol=0)
    assert read_state_info(path).cls == "Mahalanobis"


def test_loads_from_path_bytes_bytearray_and_memoryview(saved: tuple[Tensors, Meta], tmp_path: Path) -> None:
    data = rebuilt(saved, lambda t, m: None)
    path = tmp_path / "state.safetensors"
    path.write_bytes(data)
    query = torch.randn(5, 4)
    scores = [
        load_detector(s).predict_features(query) for s in (path, str(path), data, bytearray(data), memoryview(data))
    ]
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0], rtol=0, atol=0)
    loaded = load_detector(path)
    loaded.mu += 1.0  # the loaded tensors own writable memory
    assert read_state_info(memoryview(data)).num_classes == 3


def test_error_messages_name_no_server_path(saved: tuple[Tensors, Meta], tmp_path: Path) -> None:
    data = rebuilt(saved, lambda t, m: None)
    cut, garbage = tmp_path / "cut.safetensors", tmp_path / "garbage.safetensors"
    cut.write_bytes(data[:-5])
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"x" * 40)
    for source in (tmp_path / "absent.safetensors", tmp_path, cut, garbage):
        for call in (load_detector, read_state_info):
            with pytest.raises(InvalidStateError) as err:
                call(source)
            assert str(tmp_path) not in str(err.value) and "0x" not in str(err.value)
            assert err.value.__cause__ is None or not isinstance(err.value.__cause__, OSError)
