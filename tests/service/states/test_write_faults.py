"""Writes that fail at any step (an injected ``OSError``: no space, over quota, an I/O error) or run out of space
on a real small volume: nothing changes (the old state stays active and readable), nothing is left behind and no
file descriptor leaks; a full volume is :class:`~service.errors.InsufficientStorageError` (507)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.errors import InsufficientStorageError
from service.states.store import StateStore
from tests.service.states.crash_child import CHUNKS, NEW, OLD1, OLD2, SCENARIOS, payload


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class _FaultyFile:
    """A file object from ``os.fdopen`` whose ``write`` and ``flush`` count as calls that may fail."""

    def __init__(self, inner: Any, faults: Faults) -> None:
        self._inner, self._faults = inner, faults

    def write(self, data: bytes) -> int:
        self._faults.hit()
        return int(self._inner.write(data))

    def flush(self) -> None:
        self._faults.hit()
        self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


class Faults:
    """Make the ``nth`` of the calls a write goes through (``os.mkdir``, ``os.open`` (``mkstemp``), file writes
    and flushes, ``os.fsync``, ``os.replace``) raise ``OSError(err)``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, nth: int, err: int) -> None:
        self.nth, self.err, self.calls = nth, err, 0
        for name in ("mkdir", "open", "fsync", "replace"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FaultyFile(real_fdopen(*a, **k), self))

    def hit(self) -> None:
        self.calls += 1
        if self.calls == self.nth:
            raise OSError(self.err, os.strerror(self.err))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.hit()
            return real(*args, **kwargs)

        return call


def write(store: StateStore, op: str, model: str, name: str, data: bytes) -> None:
    if op == "put":
        store.put(model, name, data, "X")
        return
    step = len(data) // CHUNKS + 1
    with store.upload() as upload:
        for index in range(CHUNKS):
            upload.file.write(data[index * step : (index + 1) * step])
        store.put_file(model, name, upload.path, "X")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("op", "scenario", "err"),
    [
        ("put", "existing", errno.ENOSPC),
        ("put", "new_detector", errno.ENOSPC),
        ("put", "new_model", errno.ENOSPC),
        ("put_file", "existing", errno.ENOSPC),
        ("put_file", "new_model", errno.ENOSPC),
        ("put", "existing", errno.EDQUOT),
        ("put_file", "new_detector", errno.EDQUOT),
        ("put", "new_model", errno.EIO),
        ("put_file", "existing", errno.EIO),
    ],
)
def test_a_write_failing_at_any_step_changes_nothing(tmp_path: Path, op: str, scenario: str, err: int) -> None:
    """ENOSPC / EDQUOT: ``InsufficientStorageError`` (no path in it); another error propagates as it is. Either
    way the old state is intact and the tree is exactly what it was (no temporary file, upload, new version,
    folder or lock file), and no file descriptor is leaked."""
    model, name = SCENARIOS[scenario]
    failures = 0
    for nth in range(1, 100):
        store = StateStore(tmp_path / f"n{nth}")
        store.put("m", "d", payload(OLD1), "X")
        store.put("m", "d", payload(OLD2), "X")
        before, fds = tree(store.root), open_fds()
        error: Exception | None = None
        with pytest.MonkeyPatch.context() as monkeypatch:
            faults = Faults(monkeypatch, nth, err)
            try:
                write(store, op, model, name, payload(NEW))
            except Exception as exc:
                error = exc
        assert open_fds() == fds
        if faults.calls < nth:  # the write made fewer calls: every one has failed once
            assert error is None
            break
        if error is None:  # the fault hit a step after the commit, which only tidies up (a folder's fsync)
            assert store.read(model, name)[1] == payload(NEW)
            assert not store.cleanup().removed
            continue
        failures += 1
        if err in (errno.ENOSPC, errno.EDQUOT):
            assert type(error) is InsufficientStorageError, (nth, error)
            assert "/" not in str(error) and "full" in str(error)
        else:
            assert type(error) is OSError and error.errno == err, (nth, error)
        assert store.read("m", "d")[1] == payload(OLD2)
        assert tree(store.root) == before, nth
    else:
        pytest.fail("the write never completed")
    assert failures >= 8


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (needs root with CAP_SYS_ADMIN, else the test is skipped)."""
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to mount a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a 256 KiB tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_writes_larger_than_the_free_space_of_a_real_small_volume(small_volume: Path) -> None:
    store = StateStore(small_volume / "states")
    old = payload(OLD1, 16 * 1024)
    store.put("m", "d", old, "X")
    before, free = tree(store.root), free_bytes(small_volume)
    attempts = 0
    for model, name in (("m", "d"), ("m", "e"), ("n", "x")):
        for size in (512 * 1024, free, free - 100):  # far too large; the file fits but active.json does not
            with pytest.raises(InsufficientStorageError) as raised:
                store.put(model, name, payload(NEW, size), "X")
            assert "/" not in str(raised.value)
            attempts += 1
            assert store.read("m", "d")[1] == old
            assert tree(store.root) == before, (model, name, size)
            assert free_bytes(small_volume) == free  # every block given back
    with pytest.raises(InsufficientStorageError), store.upload() as upload:  # streamed until the volume is full
        while True:
            upload.file.write(payload(NEW, 64 * 1024))
    assert tree(store.root) == before and free_bytes(small_volume) == free
    assert store.put("m", "d", payload(NEW, 16 * 1024), "X").version == 2  # the space is usable again
    assert store.read("m", "d")[1] == payload(NEW, 16 * 1024)
    assert attempts == 9
