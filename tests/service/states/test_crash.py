"""Writes killed (SIGKILL) at every step in a child process, and writes that fail or run out of space: the active
state stays readable and is the old one before the commit point (``active.json`` renamed) and the new one after;
after a cleanup nothing is left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from service.errors import DetectorNotFoundError, InsufficientStorageError
from service.states.store import ACTIVE, CleanupReport, StateStore
from tests.service.states.crash_child import CHUNKS, KEEP, NEW, OLD1, OLD2, SCENARIOS, payload

REPO = Path(__file__).resolve().parents[3]


class Named(NamedTuple):
    op: str
    kill: dict[str, Any]
    committed: bool
    found: dict[str, int]  # what the cleanup must remove: CleanupReport field -> count


VERSION_RENAME = {"call": "replace", "match": ".safetensors"}
COMMIT = {"call": "replace", "match": ACTIVE}
NAMED = {
    "put-before-the-version-rename": Named("put", {**VERSION_RENAME, "when": "before"}, False, {"uploads": 1}),
    "put_file-before-the-version-rename": Named(
        "put_file", {**VERSION_RENAME, "when": "before"}, False, {"uploads": 1}
    ),
    "after-the-version-rename": Named("put_file", {**VERSION_RENAME, "when": "after"}, False, {"versions": 1}),
    "before-the-commit": Named("put", {**COMMIT, "when": "before"}, False, {"versions": 1, "temp_files": 1}),
    "after-the-commit": Named("put", {**COMMIT, "when": "after"}, True, {"versions": 1}),
    "during-the-upload-stream": Named("put_file", {"chunks": 2}, False, {"uploads": 1}),
}
SWEEPS = [("put", "existing"), ("put", "new_detector"), ("put_file", "existing"), ("put_file", "new_model")]


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every job run in one fresh interpreter (``python -m``), each write in a process of its own, then grouped."""
    base = tmp_path_factory.mktemp("crashes")
    jobs: list[dict[str, Any]] = [
        {"id": name, "scenario": "existing", "op": named.op, "kill": named.kill} for name, named in NAMED.items()
    ] + [{"id": f"{op}-{scenario}", "scenario": scenario, "op": op, "kill": {"nth": "all"}} for op, scenario in SWEEPS]
    for job in jobs:
        job.update(root=str(base / job["id"]), trace=str(base / f"{job['id']}.trace"))
    (base / "jobs.json").write_text(json.dumps(jobs))
    child = subprocess.run(
        [sys.executable, "-m", "tests.service.states.crash_child", "sweep", str(base / "jobs.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == 0, child.stderr
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in json.loads(child.stdout.splitlines()[-1]):
        assert run["status"] in ("killed", "done"), child.stderr
        grouped.setdefault(run["id"], []).append(run)
    return grouped


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_tidy(root: Path) -> None:
    """No temporary file, upload, trash, folder without ``active.json`` or lock file without its folder."""
    for path in root.rglob("*"):
        where = path.relative_to(root)
        assert not path.name.endswith(".tmp") and not path.name.startswith(".deleted-"), where
        if path.is_dir() and len(where.parts) == 2:
            assert (path / ACTIVE).is_file(), where
        if path.name.endswith(".lock"):
            assert (path.parent / path.name[1 : -len(".lock")]).is_dir(), where
        if path.is_dir() and len(where.parts) == 1 and where.name != ".uploads":
            assert any(path.iterdir()) or where.name == "n", where  # an empty model folder: see crash_child


def version_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("v*.safetensors"))


def check_recovered(run: dict[str, Any]) -> tuple[bool, CleanupReport]:
    """Clean up after a killed write and check the states; whether the write had committed, and the report."""
    root, trace = Path(run["root"]), Path(run["trace"])
    lines = trace.read_text().splitlines() if trace.exists() else []
    committed = any(line.startswith("replace ") and line.endswith(f" {ACTIVE}") for line in lines)
    assert run["status"] == "killed" or committed
    store = StateStore(root, keep=KEEP)
    report = store.cleanup()
    target = SCENARIOS[run["scenario"]]
    expected: dict[tuple[str, str], bytes | None] = {("m", "d"): payload(OLD2)}
    expected[target] = payload(NEW) if committed else (payload(OLD2) if target == ("m", "d") else None)
    for (model, name), data in expected.items():
        if data is None:
            with pytest.raises(DetectorNotFoundError):
                store.read(model, name)
            assert not (root / model / name).exists() and not (root / model / f".{name}.lock").exists()
        else:
            info, read = store.read(model, name)  # checks the sha256 too
            assert read == data and info.size_bytes == len(data)
    kept = {("m", "d"): ["v1.safetensors", "v2.safetensors"]}
    if committed:
        kept[target] = ["v2.safetensors", "v3.safetensors"] if target == ("m", "d") else ["v1.safetensors"]
    for (model, name), files in kept.items():
        assert version_files(root / model / name) == files
    assert_tidy(root)
    assert not store.cleanup().removed  # nothing left for a second pass
    assert store.put("m", "d", b"after", "X").version == (4 if committed and target == ("m", "d") else 3)
    return committed, report


@pytest.mark.parametrize("name", NAMED)
def test_a_write_killed_at_a_named_point(crashes: dict[str, list[dict[str, Any]]], name: str) -> None:
    (run,) = crashes[name]
    assert run["status"] == "killed"
    committed, report = check_recovered(run)
    assert committed == NAMED[name].committed
    found = {key: len(value) for key, value in vars(report).items() if value}
    assert found == NAMED[name].found, report
    if "versions" in found:  # the one never committed, or the one the commit had not removed yet
        assert report.versions == ["m/d/v1.safetensors" if committed else "m/d/v3.safetensors"]


@pytest.mark.parametrize(("op", "scenario"), SWEEPS)
def test_a_write_killed_at_every_step(crashes: dict[str, list[dict[str, Any]]], op: str, scenario: str) -> None:
    runs = crashes[f"{op}-{scenario}"]
    assert runs[-1]["status"] == "done" and all(run["status"] == "killed" for run in runs[:-1])
    committed = [check_recovered(run)[0] for run in runs]
    assert committed.count(False) >= 4 and committed.count(True) >= 2  # kill points before and after the commit
    assert committed == sorted(committed)  # old until the commit point, new from there on


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
