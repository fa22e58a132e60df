"""Detector states on disk: ``<state_dir>/<model>/<detector>/v<N>.safetensors`` plus ``active.json``.

A write stores the new version atomically (temporary file, fsync, rename) and then atomically replaces
``active.json`` (the commit point), then fsyncs the folder so the renames survive a power cut. The previously
active version's file is kept (``v<N-1>``); older ones are removed. ``active.json`` records the version, sha256,
size, detector class and upload time; loading checks the sha256. A write that fails at any step leaves the
previous ``active.json`` and its file untouched.

Several replicas may share ``root`` (a ReadWriteMany volume): every write and delete of a detector holds an
exclusive ``flock`` on ``<model>/.<detector>.lock`` (besides this process's lock), so versions only grow, a
version file is never overwritten and the cleanup never removes a version another replica is writing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ood_core.state import write_atomic
from service.engine.active import StoredState
from service.errors import DetectorNotFoundError
from service.settings import check_name, is_valid_name

ACTIVE = "active.json"
_VERSION_FILE = re.compile(r"^v(\d+)\.safetensors$")
__all__ = ["ACTIVE", "StateStore", "StoredState", "check_name", "fsync_dir", "sha256_hex"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, removals) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StateStore:
    """Versioned, atomically written detector states of every model under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def _dir(self, model: str, name: str) -> Path:
        return self.root / check_name("model", model) / check_name("detector", name)

    def list_states(self, model: str) -> list[StoredState]:
        base = self.root / check_name("model", model)
        if not base.is_dir():
            return []
        states = []
        for child in sorted(base.iterdir()):
            if child.is_dir() and is_valid_name(child.name) and (child / ACTIVE).is_file():
                states.append(self.info(model, child.name))
        return states

    def info(self, model: str, name: str) -> StoredState:
        path = self._dir(model, name) / ACTIVE
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DetectorNotFoundError(f"model {model!r} has no stored detector {name!r}") from None
        return StoredState(model=model, name=name, **meta)

    def read(self, model: str, name: str, attempts: int = 3) -> tuple[StoredState, bytes]:
        """The active version's bytes; raises ``ValueError`` if the file is missing or does not match its sha256.

        Reads take no lock: a file removed between reading ``active.json`` and the file (another replica replaced
        the state twice meanwhile) is retried with the new ``active.json``."""
        for attempt in range(attempts):
            info = self.info(model, name)
            try:
                data = (self._dir(model, name) / f"v{info.version}.safetensors").read_bytes()
            except FileNotFoundError:
                if attempt + 1 < attempts:
                    continue
                raise ValueError(f"stored state {model}/{name} v{info.version} is missing") from None
            if sha256_hex(data) != info.sha256:
                raise ValueError(f"stored state {model}/{name} v{info.version} does not match its sha256")
            return info, data
        raise AssertionError("unreachable")

    def _versions(self, folder: Path) -> list[int]:
        found = (_VERSION_FILE.match(p.name) for p in folder.iterdir()) if folder.is_dir() else iter(())
        return sorted(int(m.group(1)) for m in found if m)

    def _active_version(self, folder: Path) -> int | None:
        try:
            return int(json.loads((folder / ACTIVE).read_text(encoding="utf-8"))["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextmanager
    def _locked(self, model: str, name: str) -> Iterator[None]:
        """Exclusive over this process and every other one writing the same detector under ``root``."""
        base = self.root / check_name("model", model)
        base.mkdir(parents=True, exist_ok=True)
        with self._lock, open(base / f".{check_name('detector', name)}.lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def put(self, model: str, name: str, data: bytes, detector_class: str) -> StoredState:
        """Store ``data`` as the next version and make it active; keep the previously active version."""
        folder = self._dir(model, name)
        with self._locked(model, name):
            created = not folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            if created:
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
            previous = self._active_version(folder)
            version = max(self._versions(folder), default=0) + 1
            write_atomic(folder / f"v{version}.safetensors", data)
            info = StoredState(
                model=model,
                name=name,
                version=version,
                sha256=sha256_hex(data),
                size_bytes=len(data),
                detector_class=detector_class,
                uploaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            meta = {k: v for k, v in asdict(info).items() if k not in ("model", "name")}
            write_atomic(folder / ACTIVE, json.dumps(meta, indent=1).encode())
            for old in self._versions(folder):
                if old not in (version, previous):  # also files of versions a failed write left behind
                    (folder / f"v{old}.safetensors").unlink(missing_ok=True)
            fsync_dir(folder)
        return info

    def delete(self, model: str, name: str) -> None:
        """Remove the detector with all its versions (renamed away first, so the removal is atomic)."""
        folder = self._dir(model, name)
        with self._locked(model, name):
            if not (folder / ACTIVE).is_file():
                raise DetectorNotFoundError(f"model {model!r} has no stored detector {name!r}")
            trash = folder.with_name(f".deleted-{name}-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(folder, trash)
            fsync_dir(folder.parent)
            shutil.rmtree(trash, ignore_errors=True)
