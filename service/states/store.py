"""Detector states on disk: ``<state_dir>/<model>/<detector>/v<N>.safetensors`` plus ``active.json``.

A write streams the state into an upload file ``<state_dir>/.uploads/.upload-XXXX.tmp`` (the states' file system)
and fsyncs it; then, holding the detector's lock, renames it into place as the next version, fsyncs the folder
and atomically replaces ``active.json`` (temporary file, fsync, rename: the commit point), then fsyncs the folder
again so the renames survive a power cut. The last ``keep`` versions are kept (the active one and the ``keep - 1``
highest below it); older ones are removed. ``active.json`` records the version, sha256, size, detector class and
upload time, and the kept versions' ``history`` (:mod:`service.states.versions`: where each came from); loading
checks the sha256. Writing the bytes of the active version again changes nothing (no new version).
:meth:`StateStore.put` (bytes) and :meth:`StateStore.put_file` (a finished :meth:`StateStore.upload`, hashed in
chunks: memory does not grow with the state) share that commit.

A write that fails at any step leaves the previous ``active.json`` and its file untouched and removes what it
made: its upload file, its version file, a detector folder (with lock file and model folder) it created. A full
volume (``ENOSPC``, ``EDQUOT``) raises :class:`~service.errors.InsufficientStorageError` (HTTP 507); other
``OSError`` s propagate. What a killed write leaves behind, :meth:`StateStore.cleanup` removes
(:mod:`service.states.cleanup`); it runs at start-up and, for the folder written, after every write.

Several replicas may share ``root`` (a ReadWriteMany volume): every write, delete and cleanup of a detector holds
an exclusive ``flock`` on ``<model>/.<detector>.lock`` (besides this process's lock), so versions only grow, a
version file is never overwritten and a cleanup never touches a write in progress. A delete removes the lock file
with its detector: whoever acquires a lock checks that ``.<detector>.lock`` still names the file it locked, and
otherwise locks again. An upload holds an exclusive ``flock`` on its own file until it is consumed or removed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from service.engine.active import StoredState
from service.errors import DetectorNotFoundError
from service.settings import check_name, is_valid_name
from service.states.cleanup import (
    ACTIVE,
    TRASH_PREFIX,
    UPLOADS,
    CleanupReport,
    HeldLock,
    Upload,
    clean_root,
    clean_trash,
    close_upload,
    open_upload,
    versions,
)
from service.states.commit import (
    NO_SPACE,
    STORED_FIELDS,
    commit_version,
    fsync_dir,
    no_space,
    sha256_hex,
    sync_and_hash,
)
from service.states.locking import detector_lock
from service.states.versions import (
    DEFAULT_KEEP,
    UPLOAD,
    StoredVersion,
    VersionOrigin,
    active_entry,
    from_file,
    history_of,
    kept_below,
)

__all__ = [
    "ACTIVE",
    "CleanupReport",
    "StateStore",
    "StoredState",
    "StoredVersion",
    "Upload",
    "VersionOrigin",
    "check_name",
    "fsync_dir",
    "sha256_hex",
]


class StateStore:
    """Versioned, atomically written detector states of every model under ``root``; the last ``keep`` versions of
    each are kept."""

    def __init__(self, root: Path, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self._lock = threading.Lock()
        self._live: dict[Path, Upload] = {}

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

    def _meta(self, model: str, name: str) -> dict[str, Any]:
        path = self._dir(model, name) / ACTIVE
        try:
            meta: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DetectorNotFoundError(f"model {model!r} has no stored detector {name!r}") from None
        return meta

    def info(self, model: str, name: str) -> StoredState:
        meta = self._meta(model, name)
        return StoredState(model=model, name=name, **{key: meta[key] for key in STORED_FIELDS})

    def versions(self, model: str, name: str) -> list[StoredVersion]:
        """The kept versions, newest first (the active one is the highest). Takes no lock: a file removed
        meanwhile is left out."""
        folder = self._dir(model, name)
        meta = self._meta(model, name)
        active = int(meta["version"])
        history = {**history_of(meta), active: active_entry(meta)}
        found = []
        for version in sorted({active, *kept_below(versions(folder), active, self.keep)}, reverse=True):
            path = folder / f"v{version}.safetensors"
            try:
                found.append(history[version] if version in history else from_file(path, version))
            except FileNotFoundError:
                continue
        return found

    def open_version(self, model: str, name: str, version: int) -> tuple[StoredVersion, BinaryIO]:
        """A kept version and its file, open for reading (a later write removing it does not affect the reader);
        :class:`DetectorNotFoundError` if that version is not kept."""
        kept = {v.version: v for v in self.versions(model, name)}
        try:
            entry = kept[version]
            return entry, open(self._dir(model, name) / f"v{version}.safetensors", "rb")  # noqa: SIM115
        except (KeyError, FileNotFoundError):
            raise DetectorNotFoundError(
                f"detector {name!r} of model {model!r} has no kept version {version}; kept: "
                f"{', '.join(str(v) for v in sorted(kept)) or '(none)'}"
            ) from None

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

    @contextmanager
    def _locked(self, model: str, name: str) -> Iterator[HeldLock]:
        """The detector's write lock (:func:`service.states.locking.detector_lock`)."""
        with detector_lock(self.root, model, name, self._lock) as held:
            yield held

    @contextmanager
    def upload(self) -> Iterator[Upload]:
        """A new upload file under ``<root>/.uploads/``, locked (``flock``) until the context ends and removed then
        unless :meth:`put_file` consumed it. A full volume raises ``InsufficientStorageError``."""
        try:
            (self.root / UPLOADS).mkdir(parents=True, exist_ok=True)
            upload = open_upload(self.root / UPLOADS)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise no_space("the upload") from exc
            raise
        self._live[upload.path] = upload
        try:
            yield upload
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise no_space("the upload") from exc
            raise
        finally:
            self._live.pop(upload.path, None)
            close_upload(upload)

    def put(
        self, model: str, name: str, data: bytes, detector_class: str, origin: VersionOrigin = UPLOAD
    ) -> StoredState:
        """Store ``data`` as the next version and make it active; keep the last ``keep`` versions."""
        self._dir(model, name)  # an invalid name fails before anything is written
        with self.upload() as upload:
            upload.file.write(data)
            return self.put_file(model, name, upload.path, detector_class, origin)

    def put_file(
        self, model: str, name: str, path: Path, detector_class: str, origin: VersionOrigin = UPLOAD
    ) -> StoredState:
        """Make the upload file ``path`` (of :meth:`upload`) the next version, active; keep the last ``keep``.

        The file is flushed and closed (an upload of this store), fsynced and hashed in chunks, then renamed into
        place under the detector's lock: consumed on success, left to its upload context on failure. The same bytes
        as the active version's change nothing: the active version is returned and the file is not consumed."""
        folder = self._dir(model, name)
        path = Path(path)
        if path.parent.resolve() != (self.root / UPLOADS).resolve():
            raise ValueError("put_file takes the path of an upload from StateStore.upload()")
        try:
            digest, size = sync_and_hash(path, list(self._live.values()))
            with self._locked(model, name) as held:
                return commit_version(self.root, self.keep, held, folder, path, (digest, size, detector_class), origin)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise no_space(f"detector {name!r} of model {model!r}") from exc
            raise

    def delete(self, model: str, name: str) -> None:
        """Remove the detector with all its versions (renamed away first, so the removal is atomic) and its lock
        file."""
        folder = self._dir(model, name)
        with self._locked(model, name) as held:
            if not (folder / ACTIVE).is_file():
                held.drop = not folder.exists()
                raise DetectorNotFoundError(f"model {model!r} has no stored detector {name!r}")
            trash = folder.with_name(f"{TRASH_PREFIX}{name}-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(folder, trash)
            held.drop = True
            fsync_dir(folder.parent)
            shutil.rmtree(trash, ignore_errors=True)
        report = CleanupReport()
        clean_trash(self.root, folder.parent, report)
        report.log()

    def cleanup(self) -> CleanupReport:
        """Remove what interrupted writes left under ``root``, each detector folder under its lock, and log it
        (see :mod:`service.states.cleanup`). Safe while other processes write: it never waits for an upload."""
        return clean_root(self.root, self._locked, self.keep)
