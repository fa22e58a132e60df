"""The state store's write discipline: temporary file, fsync, rename; the commit point is ``active.json``; a failed
write leaves the active version readable; the previously active version is the one kept; processes sharing the
directory never write the same version."""

from __future__ import annotations

import errno
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from service.errors import DetectorNotFoundError, InsufficientStorageError, InvalidNameError
from service.states.store import ACTIVE, StateStore, sha256_hex


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_every_file_is_fsynced_before_it_is_renamed_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(f"fsync {os.fstat(fd).st_ino}")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        assert os.stat(src).st_dev == os.stat(Path(dst).parent).st_dev  # one file system: the rename is atomic
        events.append(f"rename {os.stat(src).st_ino} {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    StateStore(tmp_path).put("m", "d", b"state-bytes", "EnergyBased")
    folder = os.stat(tmp_path / "m" / "d").st_ino
    renames = [(i, e.split()) for i, e in enumerate(events) if e.startswith("rename")]
    assert [name for _, (_, _, name) in renames] == ["v1.safetensors", ACTIVE]
    for index, (_, inode, _) in renames:
        assert f"fsync {inode}" in events[:index]  # the data is on disk before its name is
    version_rename, commit = (index for index, _ in renames)
    assert f"fsync {folder}" in events[version_rename:commit]  # the version's name is on disk before active.json
    assert events[-1] == f"fsync {folder}"  # and the folder entries after the last rename


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_failed_write_leaves_the_active_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """A full volume is an ``InsufficientStorageError``, another error propagates; either way nothing is left."""
    store = StateStore(tmp_path)
    store.put("m", "d", b"first", "EnergyBased")
    folder = tmp_path / "m" / "d"
    real_replace = os.replace

    def fail_on_commit(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst).name == ACTIVE:
            raise OSError(err, os.strerror(err))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_commit)
    with pytest.raises(InsufficientStorageError if err == errno.ENOSPC else OSError) as raised:
        store.put("m", "d", b"second", "EnergyBased")
    assert isinstance(raised.value, InsufficientStorageError) == (err == errno.ENOSPC)
    monkeypatch.setattr(os, "replace", real_replace)
    info, data = store.read("m", "d")
    assert (info.version, data) == (1, b"first")
    assert files(folder) == [ACTIVE, "v1.safetensors"]  # no temporary file, no uncommitted v2
    assert not any((tmp_path / ".uploads").iterdir())  # nor the upload
    assert store.put("m", "d", b"third", "EnergyBased").version == 2  # v2 was never committed: its number is free
    assert files(folder) == [ACTIVE, "v1.safetensors", "v2.safetensors"]
    assert store.read("m", "d")[1] == b"third"


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_replacing_keeps_exactly_the_last_versions(tmp_path: Path, keep: int) -> None:
    store = StateStore(tmp_path, keep=keep)
    for version, payload in enumerate((b"a", b"b", b"c", b"d"), start=1):
        assert store.put("m", "d", payload, "EnergyBased").version == version
    folder = tmp_path / "m" / "d"
    kept = list(range(5 - keep, 5))
    assert files(folder) == [ACTIVE, *(f"v{v}.safetensors" for v in kept)]
    assert [(v.version, v.sha256) for v in store.versions("m", "d")] == [
        (v, sha256_hex(b"abcd"[v - 1 : v])) for v in reversed(kept)
    ]
    assert (folder / f"v{kept[0]}.safetensors").read_bytes() == b"abcd"[kept[0] - 1 : kept[0]]


def test_the_same_bytes_again_make_no_new_version(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = store.put("m", "d", b"same", "EnergyBased")
    assert store.put("m", "d", b"same", "EnergyBased") == first
    assert files(tmp_path / "m" / "d") == [ACTIVE, "v1.safetensors"] and files(tmp_path / ".uploads") == []
    assert store.put("m", "d", b"other", "EnergyBased").version == 2
    assert store.put("m", "d", b"same", "EnergyBased").version == 3  # an older version's bytes are a new one


def _put_many(root: str, worker: int, count: int, results: Any) -> None:
    store = StateStore(Path(root))
    results.put([store.put("m", "d", f"{worker}-{i}".encode(), "X").version for i in range(count)])


def test_processes_sharing_the_directory_get_distinct_growing_versions(tmp_path: Path) -> None:
    """Two processes (replicas on one volume) writing the same detector at once: the file lock orders them."""
    context = multiprocessing.get_context("fork")  # fast; the children only do file I/O
    results = context.Queue()
    workers = [context.Process(target=_put_many, args=(str(tmp_path), w, 15, results)) for w in range(2)]
    for worker in workers:
        worker.start()
    versions = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert all(v == sorted(v) for v in versions)  # each writer sees its versions grow
    assert sorted(versions[0] + versions[1]) == list(range(1, 31))  # no version written twice, none skipped
    info, data = StateStore(tmp_path).read("m", "d")
    assert info.version == 30 and data.decode().split("-")[1] == "14"  # the last write of its writer
    assert files(tmp_path / "m" / "d") == [ACTIVE, "v28.safetensors", "v29.safetensors", "v30.safetensors"]
    assert files(tmp_path / ".uploads") == []


def test_store_versions_sha_and_delete(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = store.put("m", "d", b"one", "EnergyBased")
    second = store.put("m", "d", b"two", "EnergyBased")
    third = store.put("m", "d", b"three", "EnergyBased")
    assert (first.version, second.version, third.version) == (1, 2, 3)
    fourth = store.put("m", "d", b"four", "EnergyBased")
    assert fourth.version == 4
    assert sorted(p.name for p in (tmp_path / "m" / "d").glob("v*")) == [f"v{v}.safetensors" for v in (2, 3, 4)]
    store.put("m", "d", b"three", "EnergyBased")  # v5 (not the active bytes)
    info, data = store.read("m", "d")
    assert data == b"three" and info.sha256 == sha256_hex(b"three") and info.size_bytes == 5
    assert [s.name for s in store.list_states("m")] == ["d"]
    (tmp_path / "m" / "d" / "v5.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        store.read("m", "d")
    store.delete("m", "d")
    assert store.list_states("m") == [] and not (tmp_path / "m" / "d").exists()
    assert files(tmp_path / "m") == []  # the lock file went with its detector; the model folder stays
    with pytest.raises(DetectorNotFoundError):
        store.delete("m", "d")
    with pytest.raises(DetectorNotFoundError):
        store.delete("other", "d")
    assert files(tmp_path / "m") == [] and not (tmp_path / "other").exists()  # a failed delete made nothing
    with pytest.raises(InvalidNameError):
        store.put("m", "../escape", b"x", "EnergyBased")
    assert files(tmp_path / ".uploads") == []
