"""Streaming fit sources: a folder, a zip, a tar.gz, WebDataset shards and precomputed outputs list the same samples
(keys and labels) and read the same bytes; every rank reads its own share, together all of it; bad data is refused
with a reason that names the member."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from service.fit.sources import DataSourceError, SourceLimits, iter_batches, open_source
from tests.service.fit.conftest import DigitsTree, write_tar, write_zip

LABELS = [str(d) for d in range(6)]


def listing(path: str) -> list[tuple[str, int]]:
    index = open_source(path, LABELS).scan()
    return sorted(zip(index.keys, index.labels.tolist(), strict=True))


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "wds", "outputs"])
def test_every_container_lists_the_directory_samples(kind: str, containers: dict[str, str]) -> None:
    assert listing(containers[kind]) == listing(containers["dir"])


def test_directory_keys_and_labels(digits_tree: DigitsTree, containers: dict[str, str]) -> None:
    want = sorted(zip(digits_tree.keys, digits_tree.labels.tolist(), strict=True))
    assert listing(containers["dir"]) == want
    assert {label for _, label in want} == {-1, 0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("kind", ["dir", "zip", "tar.gz", "wds", "outputs"])
@pytest.mark.parametrize("world", [2, 4])
def test_rank_shares_partition_the_samples(kind: str, world: int, containers: dict[str, str]) -> None:
    source = open_source(containers[kind], LABELS)
    shares = [source.scan(rank, world) for rank in range(world)]
    keys = [k for s in shares for k in s.keys]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(source.scan().keys)
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= (40 if kind == "wds" else 1)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "wds"])
def test_archives_read_the_files_bytes(kind: str, containers: dict[str, str], digits_tree: DigitsTree) -> None:
    source = open_source(containers[kind], LABELS)
    index = source.scan(1, 2)
    wanted = list(range(0, len(index), 7))
    got = dict(source.read(index, wanted))
    assert sorted(got) == wanted
    for ordinal, data in got.items():
        assert data == digits_tree.pngs[f"{index.keys[ordinal]}.png"]


def test_batches_decode_in_worker_processes_like_the_served_path(
    containers: dict[str, str], digits_tree: DigitsTree
) -> None:
    from service.demo import demo_model_configs
    from service.engine.preprocess import Preprocessor
    from service.fit.sources import ImageDecoder

    config = demo_model_configs()[0]
    decoder = ImageDecoder(Preprocessor(config.preprocessing, config.input_size), 10**6)
    source = open_source(containers["zip"], LABELS)
    index = source.scan()
    batches = list(iter_batches(source, index, list(range(len(index))), batch_size=32, workers=2, decoder=decoder))
    seen = torch.cat([b.ordinals for b in batches])
    assert sorted(seen.tolist()) == list(range(len(index)))
    position = {k: i for i, k in enumerate(digits_tree.keys)}
    for batch in batches:
        for ordinal, pixels in zip(batch.ordinals.tolist(), batch.pixels, strict=True):
            assert torch.equal(pixels, digits_tree.pixels[position[index.keys[ordinal]]])


# ---------------------------------------------------------------------- refusals
@pytest.fixture
def png(digits_tree: DigitsTree) -> bytes:
    return next(iter(digits_tree.pngs.values()))


def refused(path: Path | str, *needles: str, limits: SourceLimits | None = None) -> str:
    with pytest.raises(DataSourceError) as caught:
        open_source(path, LABELS, limits=limits).scan()
    for needle in needles:
        assert needle in caught.value.detail, caught.value.detail
    return caught.value.detail


def test_unknown_class_folder_lists_the_known_ones(tmp_path: Path, png: bytes) -> None:
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "0").mkdir()
    (tmp_path / "tree" / "0" / "a.png").write_bytes(png)
    (tmp_path / "tree" / "cat" / "b.png").write_bytes(png)
    refused(tmp_path / "tree", "cat/b.png", "unknown class folder 'cat'", "0, 1, 2, 3, 4, 5", "ood/")


def test_image_outside_a_class_folder(tmp_path: Path, png: bytes) -> None:
    refused(write_zip(tmp_path / "x.zip", {"0/a.png": png, "loose.png": png}), "loose.png", "class folder")


def test_non_images_are_skipped_with_a_warning_and_hidden_files_ignored(tmp_path: Path, png: bytes) -> None:
    members = {"0/a.png": png, "0/notes.txt": b"hi", "0/.DS_Store": b"x", "__MACOSX/0/._a.png": b"x"}
    source = open_source(write_zip(tmp_path / "x.zip", members), LABELS)
    assert source.scan().keys == ["0/a"]
    assert any("notes.txt" in w for w in source.warnings)


@pytest.mark.parametrize("name", ["../0/evil.png", "/0/abs.png", "0/../../evil.png", "C:/0/x.png", "0\\..\\x.png"])
def test_path_traversal_and_absolute_names_are_refused(tmp_path: Path, png: bytes, name: str) -> None:
    refused(write_zip(tmp_path / "x.zip", {"0/a.png": png, name: png}), repr(name), "path-traversal")
    refused(write_tar(tmp_path / "x.tar.gz", {"0/a.png": png, name: png}), repr(name), "path-traversal")


@pytest.mark.parametrize("link", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_in_tar_are_refused(tmp_path: Path, png: bytes, link: bytes) -> None:
    path = write_tar(tmp_path / "x.tar", {"0/a.png": png}, mode="w")
    with tarfile.open(path, "a") as archive:
        info = tarfile.TarInfo("0/link.png")
        info.type, info.linkname = link, "0/a.png"
        archive.addfile(info)
    refused(path, "0/link.png", "links are refused")


def test_symlinks_in_zip_are_refused(tmp_path: Path, png: bytes) -> None:
    path = write_zip(tmp_path / "x.zip", {"0/a.png": png})
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo("0/link.png")
        info.external_attr = (0o120777 << 16) | 0x20
        archive.writestr(info, "0/a.png")
    refused(path, "0/link.png", "links are refused")


def test_declared_size_over_the_limit_is_refused_before_reading(tmp_path: Path, png: bytes) -> None:
    path = tmp_path / "big.tar"
    info = tarfile.TarInfo("0/huge.png")
    info.size = 2**40  # a 1 TiB header with no data behind it: refused from the header
    path.write_bytes(info.tobuf() + b"\0" * 1024)
    refused(path, "0/huge.png", "declared size 1099511627776 bytes exceeds the limit")
    zipped = write_zip(tmp_path / "x.zip", {"0/a.png": png})
    refused(zipped, "0/a.png", "declared size", limits=SourceLimits(max_member_bytes=100))


def test_compression_ratio_over_the_limit_is_refused(tmp_path: Path, png: bytes) -> None:
    zeros = bytes(4 * 1024 * 1024)  # 4 MiB of zeros: deflate ratio ~1000
    refused(write_zip(tmp_path / "x.zip", {"0/a.png": png, "0/bomb.png": zeros}), "0/bomb.png", "compression ratio")
    members = {"0/a.png": png, "0/bomb.png": zeros, "0/c.png": png}
    refused(write_tar(tmp_path / "x.tar.gz", members), "compression ratio", "so far")


def test_corrupt_or_truncated_archives(tmp_path: Path, png: bytes) -> None:
    path = write_tar(tmp_path / "x.tar.gz", {"0/a.png": png, "0/b.png": png})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(path, str(path), "corrupt or truncated")


def test_webdataset_refusals(tmp_path: Path, png: bytes) -> None:
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "s0", "png": png, "cls": "1"})
        sink.write({"__key__": "s1", "png": png})
    refused(tmp_path / "a.tar", "s1", "no .cls label")
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        sink.write({"__key__": "s0", "png": png, "cls": "9"})
    refused(str(tmp_path / "b.tar"), "class index 9", "6 classes")
    refused(f"pipe:cat {tmp_path}/a.tar::{tmp_path}/b.tar", "pipe:", "only local shard files")
    refused(str(tmp_path / "c-{0..1}.tar"), "no such shard file")


def test_precomputed_refusals(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from service.fit.sources import write_outputs

    write_outputs(tmp_path / "a.safetensors", {"features": torch.zeros(3, 4)}, torch.tensor([0, 7, -1]))
    refused(tmp_path / "a.safetensors", "row 1", "label 7")
    save_file({"features": torch.zeros(3, 4)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(DataSourceError, match="needs a 'labels' tensor"):
        open_source(tmp_path / "b.safetensors", LABELS)
    save_file(
        {"features": torch.zeros(3, 4), "labels": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "c.safetensors")
    )
    with pytest.raises(DataSourceError, match="rows"):
        open_source(tmp_path / "c.safetensors", LABELS)


def test_unknown_paths_and_formats(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="no such file"):
        open_source(tmp_path / "missing.zip", LABELS)
    (tmp_path / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DataSourceError, match="not a fit data source"):
        open_source(tmp_path / "x.bin", LABELS)


def test_undecodable_image_is_reported_not_raised_in_the_worker(tmp_path: Path, png: bytes) -> None:
    from service.demo import demo_model_configs
    from service.engine.preprocess import Preprocessor
    from service.fit.sources import ImageDecoder

    config = demo_model_configs()[0]
    decoder = ImageDecoder(Preprocessor(config.preprocessing, config.input_size), 10**6)
    source = open_source(write_zip(tmp_path / "x.zip", {"0/a.png": png, "0/bad.png": b"not an image"}), LABELS)
    index = source.scan()
    (batch,) = iter_batches(source, index, [0, 1], batch_size=8, workers=1, decoder=decoder)
    assert batch.ordinals.tolist() == [0]
    ((ordinal, reason),) = batch.invalid
    assert ordinal == 1 and "0/bad.png" in reason and "cannot decode" in reason


def test_webdataset_duplicate_members_are_refused(tmp_path: Path, png: bytes) -> None:
    write_tar(tmp_path / "d.tar", {"s0.png": png, "s0.cls": b"1", "s0.PNG": png}, mode="w")
    refused(tmp_path / "d.tar", "duplicate file name")
