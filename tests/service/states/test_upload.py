"""Streaming uploads: ``StateStore.upload()`` gives a locked file under ``<root>/.uploads``; ``put_file`` fsyncs and
hashes it in chunks and renames it into place with the same commit as ``put``; an upload not consumed is removed."""

from __future__ import annotations

import errno
import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

from service.errors import InsufficientStorageError
from service.states.store import ACTIVE, StateStore


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_put_file_streams_an_upload_into_place_in_constant_memory(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    chunk, count = os.urandom(256 * 1024), 64  # 16 MiB
    with store.upload() as upload:
        assert upload.path.parent == tmp_path / ".uploads" and upload.path.name.endswith(".tmp")
        for _ in range(count):
            upload.file.write(chunk)
        tracemalloc.start()
        try:
            info = store.put_file("m", "d", upload.path, "EnergyBased")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert not upload.path.exists()  # consumed: renamed into place
    assert peak < 4 * 1024 * 1024  # a few read chunks, not the 16 MiB file
    assert (info.version, info.size_bytes, info.detector_class) == (1, len(chunk) * count, "EnergyBased")
    assert info.sha256 == hashlib.sha256(chunk * count).hexdigest()
    assert store.read("m", "d") == (info, chunk * count)
    with store.upload() as upload:
        upload.file.write(b"second")  # still in the file object's buffer: put_file flushes it
        spelled_otherwise = Path(os.path.relpath(upload.path)) if upload.path.is_absolute() else upload.path.absolute()
        assert store.put_file("m", "d", spelled_otherwise, "EnergyBased").version == 2
        with pytest.raises(ValueError):
            upload.file.write(b"late")  # closed by put_file: nothing can reach the committed version
    assert store.read("m", "d")[1] == b"second"
    assert files(tmp_path / "m" / "d") == [ACTIVE, "v1.safetensors", "v2.safetensors"]
    assert files(tmp_path / ".uploads") == []


def test_an_upload_not_consumed_is_removed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.upload() as upload:
        upload.file.write(b"abandoned")
        upload.file.close()  # closing the file does not release the upload's lock or remove it
        assert upload.path.exists()
    assert not upload.path.exists()
    with pytest.raises(RuntimeError, match="client went away"), store.upload() as upload:
        upload.file.write(b"partial")
        raise RuntimeError("client went away")
    assert files(tmp_path / ".uploads") == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_failing_upload_stream_leaves_nothing(tmp_path: Path, err: int) -> None:
    """A write that hits a full volume becomes ``InsufficientStorageError``; other errors propagate."""
    store = StateStore(tmp_path)
    store.put("m", "d", b"old", "X")
    expected = InsufficientStorageError if err != errno.EIO else OSError
    with pytest.raises(expected) as raised, store.upload() as upload:
        upload.file.write(b"some chunks")
        raise OSError(err, os.strerror(err), str(upload.path))
    assert (type(raised.value) is InsufficientStorageError) == (err != errno.EIO)
    if err != errno.EIO:
        assert str(tmp_path) not in str(raised.value)
    assert files(tmp_path / ".uploads") == []
    assert store.read("m", "d")[1] == b"old"


def test_put_file_takes_only_uploads(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "states")
    elsewhere = tmp_path / "state.safetensors"
    elsewhere.write_bytes(b"mine")
    with pytest.raises(ValueError, match="upload"):
        store.put_file("m", "d", elsewhere, "X")
    assert elsewhere.read_bytes() == b"mine"  # neither moved nor removed
    with pytest.raises(FileNotFoundError):
        store.put_file("m", "d", store.root / ".uploads" / ".upload-gone.tmp", "X")
    assert not (store.root / "m").exists()
