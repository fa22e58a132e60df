"""``StateStore.cleanup()`` and the locks it relies on: leftovers of interrupted writes are removed, the active and
the kept version never; a live upload or a write in progress in another process is never touched; a waiter on a
lock file that its holder removed locks the new one."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from service.states import cleanup as cleanup_module
from service.states.store import ACTIVE, CleanupReport, StateStore

REPO = Path(__file__).resolve().parents[3]


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_cleanup_removes_the_leftovers_of_interrupted_writes_and_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path, keep=2)
    for payload in (b"one", b"two", b"three"):
        store.put("m", "d", payload, "X")  # v2 kept, v3 active
    m, d = tmp_path / "m", tmp_path / "m" / "d"
    (d / ".active.json.abc123.tmp").write_bytes(b"{")  # a commit killed before its rename
    (d / "v1.safetensors").write_bytes(b"one")  # a commit killed before it removed the previous-but-one
    (d / "v4.safetensors").write_bytes(b"four")  # renamed into place, never committed
    (d / "notes.txt").write_text("not ours")
    (m / "orphan").mkdir()  # a first write killed before its commit
    (m / "orphan" / "v1.safetensors").write_bytes(b"x")
    (m / ".orphan.lock").touch()
    (m / ".gone.lock").touch()  # a lock file without its folder
    (m / "empty").mkdir()
    (m / "broken").mkdir()  # active.json unreadable: only the temporary file goes
    (m / "broken" / ACTIVE).write_text("not json")
    (m / "broken" / "v7.safetensors").write_bytes(b"maybe precious")
    (m / "broken" / ".active.json.x.tmp").touch()
    (m / ".deleted-old-1-2").mkdir()  # a delete killed before it removed the renamed folder
    (m / ".deleted-old-1-2" / "v1.safetensors").touch()
    (tmp_path / ".uploads" / ".upload-dead.tmp").write_bytes(b"abandoned")
    caplog.set_level(logging.INFO, logger="service.states")
    with store.upload() as live:
        live.file.write(b"in progress")
        report = store.cleanup()
        assert live.path.exists()  # its lock is held
    assert sorted(report.temp_files) == ["m/broken/.active.json.x.tmp", "m/d/.active.json.abc123.tmp"]
    assert report.uploads == [".uploads/.upload-dead.tmp"]
    assert sorted(report.versions) == ["m/d/v1.safetensors", "m/d/v4.safetensors", "m/orphan/v1.safetensors"]
    assert sorted(report.folders) == ["m/empty", "m/orphan"]
    assert sorted(report.lock_files) == ["m/.gone.lock", "m/.orphan.lock"]
    assert report.trash == ["m/.deleted-old-1-2"]
    assert files(d) == [ACTIVE, "notes.txt", "v2.safetensors", "v3.safetensors"]
    assert files(m / "broken") == [ACTIVE, "v7.safetensors"]
    assert files(m) == [".broken.lock", ".d.lock", "broken", "d"]
    assert store.read("m", "d")[1] == b"three"
    (record,) = [r for r in caplog.records if r.name == "service.states" and r.levelno == logging.INFO]
    assert record.getMessage() == "removed leftovers of interrupted state writes"
    assert record.__dict__["uploads"] == [".uploads/.upload-dead.tmp"]
    assert any("unreadable active.json" in r.getMessage() for r in caplog.records)
    assert not store.cleanup().removed


def test_every_write_cleans_its_folder(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.put("m", "d", b"one", "X")
    folder = tmp_path / "m" / "d"
    (folder / ".active.json.zzz.tmp").touch()
    (folder / "v9.safetensors").write_bytes(b"never committed")
    assert store.put("m", "d", b"two", "X").version == 2  # v9 is gone before the next number is chosen
    assert files(folder) == [ACTIVE, "v1.safetensors", "v2.safetensors"]
    (tmp_path / "m" / ".deleted-d-1-1").mkdir()
    store.delete("m", "d")
    assert files(tmp_path / "m") == []


def test_an_upload_created_while_a_cleanup_removes_it_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleanup that takes the lock of a new upload file before its creator does removes it: the creator sees that
    its path names no file any more and makes another one."""
    store = StateStore(tmp_path)
    real_mkstemp, report = tempfile.mkstemp, CleanupReport()

    def mkstemp_then_cleanup(*args: Any, **kwargs: Any) -> tuple[int, str]:
        created = real_mkstemp(*args, **kwargs)
        monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
        cleanup_module.clean_uploads(tmp_path, report)  # another process's cleanup, between creation and lock
        return created

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_cleanup)
    with store.upload() as upload:
        assert len(report.uploads) == 1 and report.uploads[0] != f".uploads/{upload.path.name}"
        assert upload.path.exists()
        assert not store.cleanup().uploads  # ours is locked
    assert files(tmp_path / ".uploads") == []


class Child:
    """``python -m tests.service.states.crash_child MODE ROOT``, with its stdout lines in a queue."""

    def __init__(self, mode: str, root: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.service.states.crash_child", mode, str(root)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def line(self, timeout: float = 60) -> str:
        return self.lines.get(timeout=timeout)

    def send(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(30)


@contextmanager
def child(mode: str, root: Path) -> Iterator[Child]:
    running = Child(mode, root)
    try:
        yield running
    finally:
        running.close()


def test_cleanup_keeps_an_upload_another_process_is_writing(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with child("hold-upload", tmp_path) as writer:
        upload = Path(writer.line())
        assert upload.exists() and not store.cleanup().uploads
        assert upload.exists()
        writer.process.send_signal(signal.SIGKILL)  # the writer dies: its lock goes with it
        assert writer.process.wait(30) == -signal.SIGKILL
    assert upload.exists()
    assert store.cleanup().uploads == [f".uploads/{upload.name}"]
    assert files(tmp_path / ".uploads") == []


def test_cleanup_waits_for_a_write_in_progress_in_another_process(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.put("m", "d", b"state", "X")
    temp = tmp_path / "m" / "d" / ".active.json.busy.tmp"
    reports: list[CleanupReport] = []
    with child("hold-lock", tmp_path) as writer:
        assert writer.line() == "locked"
        cleaner = threading.Thread(target=lambda: reports.append(store.cleanup()))
        cleaner.start()
        cleaner.join(0.5)
        assert cleaner.is_alive() and temp.exists()  # waiting for the detector's lock
        writer.send()
        assert writer.line() == "temp-present True"  # untouched while the other process held the lock
        cleaner.join(30)
        assert not cleaner.is_alive()
        assert writer.process.wait(30) == 0
    assert reports[0].temp_files == ["m/d/.active.json.busy.tmp"]  # a leftover once its writer was gone
    assert store.read("m", "d")[1] == b"state"


def _waits_on(inode: int, timeout: float = 30) -> bool:
    """Whether a process is blocked on a ``flock`` of ``inode`` (``/proc/locks``) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and any(f.endswith(f":{inode}") for f in fields):
                return True
        time.sleep(0.02)
    return False


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks to see a blocked flock")
def test_a_waiter_on_a_removed_lock_file_locks_the_new_one(tmp_path: Path) -> None:
    """A (this process) holds the lock while B (a child) waits on it; A removes the lock file, as a delete does,
    and a third party locks a new one before A releases. B then gets the lock of the removed file: it must see
    that and wait for the new one instead of going ahead next to the third party."""
    store = StateStore(tmp_path)
    lock_file = tmp_path / "m" / ".d.lock"
    holder: Any = store._locked("m", "d")
    holder.__enter__()
    try:
        with child("wait-lock", tmp_path) as waiter:
            assert waiter.line() == "ready"
            old = os.stat(lock_file).st_ino
            assert _waits_on(old), "the child never blocked on the lock"
            lock_file.unlink()
            with open(lock_file, "a+b") as third:
                fcntl.flock(third.fileno(), fcntl.LOCK_EX)
                new = os.stat(lock_file).st_ino
                assert new != old
                holder.__exit__(None, None, None)  # A releases the lock of the removed file
                holder = None
                assert _waits_on(new), "the child did not go on to wait for the new lock file"
                with pytest.raises(queue.Empty):
                    waiter.line(timeout=0.3)  # it does not believe it holds the lock
            assert waiter.line() == f"acquired {new}"  # the third party released it
            waiter.send()
            assert waiter.process.wait(30) == 0
    finally:
        if holder is not None:
            holder.__exit__(None, None, None)
