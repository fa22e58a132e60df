"""``ood-fit`` on bad data or options: exit status 1 (2 for malformed arguments), one line on stderr that names the
member and the reason, and nothing written (an existing state at ``--out`` stays as it was)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.service.fit.conftest import DigitsTree, write_tar, write_zip

pytestmark = pytest.mark.timeout(300)


def tree_members(tree: DigitsTree, per_class: int = 6) -> dict[str, bytes]:
    """A small class-folder tree (per_class images of each class and of ood/)."""
    picked: dict[str, bytes] = {}
    for name, data in tree.pngs.items():
        folder = name.split("/")[0]
        if sum(1 for n in picked if n.startswith(folder + "/")) < per_class:
            picked[name] = data
    return picked


def fails(ood_fit: Any, tmp_path: Path, data: str | Path, *needles: str, args: tuple[str, ...] = ()) -> str:
    out, report = tmp_path / "out.safetensors", tmp_path / "report.json"
    status, stdout, stderr = ood_fit(
        "--detector", "Mahalanobis", "--data", str(data), "--workers", "1", "--out", str(out), "--json", str(report),
        *args,
    )  # fmt: skip
    assert status == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ood-fit: error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not report.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary file left
    return lines[0]


def test_unknown_class_folder(ood_fit: Any, tmp_path: Path, digits_tree: DigitsTree) -> None:
    members = {**tree_members(digits_tree), "cats/x.png": next(iter(digits_tree.pngs.values()))}
    fails(ood_fit, tmp_path, write_zip(tmp_path / "d.zip", members), "cats/x.png", "unknown class folder", "0, 1, 2")


def test_undecodable_image_fails_or_is_skipped_and_counted(
    ood_fit: Any, tmp_path: Path, digits_tree: DigitsTree
) -> None:
    data = write_zip(tmp_path / "d.zip", {**tree_members(digits_tree, 12), "2/broken.png": b"\x89PNG\r\n garbage"})
    fails(ood_fit, tmp_path, data, "2/broken.png", "cannot decode image", "--skip-invalid")
    out, report = tmp_path / "ok.safetensors", tmp_path / "ok.json"
    status, stdout, stderr = ood_fit(
        "--detector", "Mahalanobis", "--data", str(data), "--workers", "1", "--skip-invalid", "--out", str(out),
        "--json", str(report),
    )  # fmt: skip
    assert status == 0, stderr
    body = json.loads(report.read_text())
    assert body["skipped"] == 1 and body["images"] == 12 * 7
    assert "1 undecodable image(s) skipped" in stdout


@pytest.mark.parametrize("name", ["../evil.png", "/0/abs.png"])
def test_path_traversal(ood_fit: Any, tmp_path: Path, digits_tree: DigitsTree, name: str) -> None:
    members = {**tree_members(digits_tree), name: b"x"}
    fails(ood_fit, tmp_path, write_tar(tmp_path / "d.tar.gz", members), repr(name), "path-traversal")


def test_link_in_tar(ood_fit: Any, tmp_path: Path, digits_tree: DigitsTree) -> None:
    path = write_tar(tmp_path / "d.tar", tree_members(digits_tree), mode="w")
    with tarfile.open(path, "a") as archive:
        info = tarfile.TarInfo("0/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    fails(ood_fit, tmp_path, path, "0/link.png", "links are refused")


def test_declared_size_and_compression_ratio(ood_fit: Any, tmp_path: Path, digits_tree: DigitsTree) -> None:
    members = tree_members(digits_tree)
    bomb = write_zip(tmp_path / "bomb.zip", {**members, "1/bomb.png": bytes(8 * 1024 * 1024)})
    fails(ood_fit, tmp_path, bomb, "1/bomb.png", "compression ratio")
    huge = tarfile.TarInfo("1/huge.png")
    huge.size = 2**40
    path = write_tar(tmp_path / "huge.tar", members, mode="w")
    data = path.read_bytes().rstrip(b"\0")  # drop the end-of-archive blocks, then a 1 TiB header with no data
    blocks = -(-len(data) // 512) * 512
    path.write_bytes(data.ljust(blocks, b"\0") + huge.tobuf() + b"\0" * 1024)
    fails(ood_fit, tmp_path, path, "1/huge.png", "declared size")


def test_an_existing_state_is_not_replaced_on_failure(ood_fit: Any, tmp_path: Path, digits_tree: DigitsTree) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous good state")
    data = write_zip(tmp_path / "d.zip", {**tree_members(digits_tree), "0/bad.png": b"nope"})
    status, _, stderr = ood_fit("--detector", "KNN", "--data", str(data), "--workers", "0", "--out", str(out))
    assert status == 1 and "0/bad.png" in stderr
    assert out.read_bytes() == b"the previous good state"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--detector", "NoSuchDetector"), "unknown detector class"),
        (("--detector", "ODIN"), "not served"),
        (("--detector", "KNN", "--hparams", '{"k": "many"}'), "KNN"),
        (("--detector", "KNN", "--calibration-share", "1.5"), "calibration_share"),
        (("--detector", "KNN", "--model", "r50"), "no model 'r50'"),
    ],
)
def test_bad_options(
    ood_fit: Any, tmp_path: Path, containers: dict[str, str], args: tuple[str, ...], needle: str
) -> None:
    out = tmp_path / "out.safetensors"
    status, _, stderr = ood_fit(*args, "--data", containers["outputs"], "--out", str(out))
    assert status == 1 and needle in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_malformed_arguments_exit_2(ood_fit: Any, tmp_path: Path) -> None:
    status, _, stderr = ood_fit("--detector", "KNN", "--hparams", "{not json", "--data", "x", "--out", "y")
    assert status == 2 and "--hparams" in stderr
