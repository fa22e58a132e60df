"""Fixtures of the offline-fit tests: the demo classifier, a generated class-folder tree of the digits data (classes
0-5 + ``ood/`` with digits 6-9, 32x32 PNGs) and the same data as a zip, a tar.gz, WebDataset shards and a
safetensors of precomputed outputs; helpers to run ``ood-fit`` and to compare saved states.

* ``digits_model`` (session): the demo ``digits`` :class:`ServedModel` on the CPU.
* ``digits_tree`` (session): :class:`DigitsTree` (root folder, sample keys, labels, the images' pixels as the
  served preprocessing gives them from the in-memory digits, not from the files).
* ``containers`` (session): ``{"dir", "zip", "tar.gz", "wds", "outputs"} -> path`` of the same samples.
* ``ood_fit(*args) -> (status, stdout, stderr)``: ``ood-fit`` in this process.
* ``directory_states`` (session): detector class -> ``ood-fit``'s state and metrics on the directory.
* ``assert_same_state(a, b)``: same class, hyperparameters and tensors (allclose; feature-bank rows in any order).
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from torch import Tensor

from ood_core.state import read_state_info
from service.engine.served_model import ServedModel

PER_CLASS = 50
OOD_IMAGES = 48
ROOT = Path(__file__).resolve().parents[3]


@dataclass
class DigitsTree:
    root: Path
    keys: list[str]
    labels: Tensor
    pixels: list[Tensor]
    pngs: dict[str, bytes]
    """relative path -> PNG bytes"""


@pytest.fixture(scope="session")
def digits_model() -> ServedModel:
    from service.demo import demo_model_configs
    from service.settings import Settings

    return ServedModel(demo_model_configs()[0], Settings(device="cpu"))


def _png(image: Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory: pytest.TempPathFactory, digits_model: ServedModel) -> DigitsTree:
    from ood_core.data import load_split

    x, y = load_split("train")
    xo, _ = load_split("near_ood")
    root = tmp_path_factory.mktemp("digits") / "tree"
    keys, labels, images, pngs = [], [], [], {}
    for label in range(6):
        for n, i in enumerate(torch.nonzero(y == label).flatten()[:PER_CLASS].tolist()):
            keys.append(f"{label}/d{n:03d}")
            labels.append(label)
            images.append(x[i])
    for n in range(OOD_IMAGES):
        keys.append(f"ood/d{n:03d}")
        labels.append(-1)
        images.append(xo[n])
    for key, image in zip(keys, images, strict=True):
        path = root / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pngs[f"{key}.png"] = _png(image)
        path.write_bytes(pngs[f"{key}.png"])
    pixels = digits_model.preprocessor.pixels_from_tensor(torch.stack(images))
    return DigitsTree(root, keys, torch.tensor(labels), pixels, pngs)


def write_zip(path: Path, members: dict[str, bytes], prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(prefix + name, data)
    return path


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session")
def containers(
    digits_tree: DigitsTree, digits_model: ServedModel, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    import webdataset as wds

    from service.fit.sources import write_outputs

    folder = tmp_path_factory.mktemp("containers")
    out = {"dir": str(digits_tree.root)}
    out["zip"] = str(write_zip(folder / "digits.zip", digits_tree.pngs, prefix="digits/"))
    out["tar.gz"] = str(write_tar(folder / "digits.tar.gz", digits_tree.pngs))
    order = torch.randperm(len(digits_tree.keys), generator=torch.Generator().manual_seed(1)).tolist()
    for shard in range(3):  # samples shuffled over 3 shards: the hold-out must not depend on the order
        with wds.TarWriter(str(folder / f"shard-{shard:02d}.tar")) as sink:
            for i in order[shard::3]:
                key = digits_tree.keys[i]
                sink.write(
                    {"__key__": key, "png": digits_tree.pngs[f"{key}.png"], "cls": str(int(digits_tree.labels[i]))}
                )
    out["wds"] = str(folder / "shard-{00..02}.tar")
    outputs = digits_model.forward_chunks(digits_tree.pixels)
    write_outputs(folder / "outputs.safetensors", outputs, digits_tree.labels, keys=digits_tree.keys)
    out["outputs"] = str(folder / "outputs.safetensors")
    return out


@pytest.fixture(scope="session")
def directory_states() -> dict[str, tuple[bytes, dict[str, float]]]:
    """Detector class -> the state and metrics of ``ood-fit`` on the directory (filled by test_cli, reused)."""
    return {}


@pytest.fixture
def ood_fit(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    from service.fit.cli import main

    monkeypatch.delenv("OOD_CONFIG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(["--no-progress", *args])
            status = 0
        except SystemExit as exc:
            status = int(exc.code) if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def state_tensors(data: bytes) -> dict[str, Tensor]:
    return load_tensors(data)


def _canonical(t: Tensor) -> Tensor:
    return torch.unique(t, dim=0) if t.dim() == 2 and t.is_floating_point() else t


def _named(name: str) -> Callable[[str], str]:
    def message(detail: str) -> str:
        return f"state tensor {name!r}: {detail}"

    return message


def assert_same_state(got: bytes, want: bytes, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    info_got, info_want = read_state_info(got), read_state_info(want)
    assert (info_got.cls, info_got.hparams) == (info_want.cls, info_want.hparams)
    assert info_got.calibration is not None and info_want.calibration is not None
    assert info_got.calibration["n"] == info_want.calibration["n"]
    a, b = state_tensors(got), state_tensors(want)
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if x.is_floating_point():
            scale = float(y.abs().max()) if y.numel() else 1.0
            if not torch.allclose(x, y, rtol=rtol, atol=atol * max(scale, 1.0)):  # a bank's rows may come in any order
                x, y = _canonical(x), _canonical(y)
            torch.testing.assert_close(
                x, y, rtol=rtol, atol=atol * max(scale, 1.0), msg=f"state tensor {name!r} differs"
            )
        else:
            assert torch.equal(x, y), name


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
