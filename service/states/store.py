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

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

from ood_core.state import write_atomic
from service.engine.active import StoredState
from service.errors import DetectorNotFoundError, InsufficientStorageError
from service.settings import check_name, is_valid_name
from service.states.cleanup import (
    ACTIVE,
    TRASH_PREFIX,
    UPLOADS,
    CleanupReport,
    HeldLock,
    Upload,
    active_version,
    clean_detector_folder,
    clean_root,
    clean_trash,
    close_upload,
    open_upload,
    same_file,
    versions,
)
from service.states.versions import (
    DEFAULT_KEEP,
    UPLOAD,
    StoredVersion,
    VersionOrigin,
    active_entry,
    from_file,
    history_of,
    kept_below,
    utc_now,
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
_STORED_FIELDS = ("version", "sha256", "size_bytes", "detector_class", "uploaded_at")
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_CHUNK = 1 << 20
logger = logging.getLogger("service.states")


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


def _no_space(what: str) -> InsufficientStorageError:
    return InsufficientStorageError(f"not enough storage for {what}: the state volume is full")


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
        return StoredState(model=model, name=name, **{key: meta[key] for key in _STORED_FIELDS})

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
        """Exclusive over this process and every other one writing the same detector under ``root``.

        A holder may remove the lock file (``held.drop``: a delete, a failed first write, a cleanup); a waiter that
        then gets the lock of the removed file sees that the path names another file (or none) and locks again. A
        model folder created here is removed again when the lock file is dropped, if it is empty."""
        base = self.root / check_name("model", model)
        held = HeldLock(base / f".{check_name('detector', name)}.lock")
        with self._lock:
            created = False
            while True:
                try:
                    base.mkdir(parents=True)
                    created = True
                except FileExistsError:
                    pass
                try:
                    handle = open(held.lock_file, "a+b")  # noqa: SIM115 (closed below or when released)
                except FileNotFoundError:
                    continue  # the model folder was just removed (a failed first write): create it again
                except BaseException:
                    if created:
                        with suppress(OSError):
                            base.rmdir()
                    raise
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                    if same_file(handle.fileno(), held.lock_file):
                        break
                except BaseException:
                    handle.close()
                    raise
                handle.close()  # we locked a removed lock file: lock the one there now
            try:
                yield held
            finally:
                try:
                    if held.drop:
                        held.lock_file.unlink(missing_ok=True)
                finally:
                    handle.close()  # releases the flock
                if held.drop and created:
                    with suppress(OSError):
                        base.rmdir()

    @contextmanager
    def upload(self) -> Iterator[Upload]:
        """A new upload file under ``<root>/.uploads/``, locked (``flock``) until the context ends and removed then
        unless :meth:`put_file` consumed it. A full volume raises ``InsufficientStorageError``."""
        try:
            (self.root / UPLOADS).mkdir(parents=True, exist_ok=True)
            upload = open_upload(self.root / UPLOADS)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _no_space("the upload") from exc
            raise
        self._live[upload.path] = upload
        try:
            yield upload
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _no_space("the upload") from exc
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
            digest, size = self._sync_and_hash(path)
            with self._locked(model, name) as held:
                return self._commit(held, folder, path, (digest, size, detector_class), origin)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _no_space(f"detector {name!r} of model {model!r}") from exc
            raise

    def _sync_and_hash(self, path: Path) -> tuple[str, int]:
        with open(path, "rb") as handle:
            # the upload by file, not by name: a relative or differently spelled path must not skip its flush
            live = next((u for u in list(self._live.values()) if same_file(u.lock_fd, path)), None)
            if live is not None:
                if not live.file.closed:
                    live.file.flush()
                    live.file.close()  # a later write fails instead of reaching the committed version
                os.fsync(live.lock_fd)  # the descriptor the data was written through: it sees writeback errors
            else:
                os.fsync(handle.fileno())
            digest, size = hashlib.sha256(), 0
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def _identical(self, folder: Path, digest: str) -> StoredState | None:
        """The active state if its bytes are ``digest`` (and its file is there), else ``None`` (lock held)."""
        try:
            meta = json.loads((folder / ACTIVE).read_text(encoding="utf-8"))
            if meta.get("sha256") != digest or not (folder / f"v{int(meta['version'])}.safetensors").is_file():
                return None
            return StoredState(model=folder.parent.name, name=folder.name, **{k: meta[k] for k in _STORED_FIELDS})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _commit(
        self, held: HeldLock, folder: Path, path: Path, file: tuple[str, int, str], origin: VersionOrigin
    ) -> StoredState:
        """Rename ``path`` (``file``: its sha256, size and detector class) into place as the next version, then
        commit it by ``active.json`` with the kept versions' history (lock held)."""
        digest, size, cls = file
        created = not folder.is_dir()
        target: Path | None = None
        if not created and (same := self._identical(folder, digest)) is not None:
            return same
        try:
            if created:
                folder.mkdir()
                fsync_dir(folder.parent)
                fsync_dir(self.root)
            previous = active_version(folder)
            try:
                old_history = history_of(json.loads((folder / ACTIVE).read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, AttributeError):
                old_history = {}
            if previous is not None or not (folder / ACTIVE).exists():
                for old in versions(folder):  # renamed into place by writes that never committed
                    if previous is None or old > previous:
                        (folder / f"v{old}.safetensors").unlink()
            target = folder / f"v{max(versions(folder), default=0) + 1}.safetensors"
            os.replace(path, target)
            fsync_dir(folder)  # the version's name is on disk before active.json names it
            info = StoredState(
                model=folder.parent.name,
                name=folder.name,
                version=int(target.stem[1:]),
                sha256=digest,
                size_bytes=size,
                detector_class=cls,
                uploaded_at=utc_now(),
            )
            entry = StoredVersion(info.version, digest, size, cls, info.uploaded_at, **asdict(origin))
            earlier = kept_below(versions(folder), info.version, self.keep)
            history = [old_history[v].to_json() for v in earlier if v in old_history] + [entry.to_json()]
            meta: dict[str, Any] = {k: v for k, v in asdict(info).items() if k not in ("model", "name")}
            meta["history"] = history
            write_atomic(folder / ACTIVE, json.dumps(meta, indent=1).encode())
        except BaseException:
            if target is not None:
                target.unlink(missing_ok=True)
            if created:
                shutil.rmtree(folder, ignore_errors=True)
                held.drop = True
            raise
        try:  # committed: the rest only tidies up, so a failure is logged, not raised
            for old in versions(folder):
                if old != info.version and old not in earlier:
                    (folder / f"v{old}.safetensors").unlink(missing_ok=True)
            fsync_dir(folder)
            report = CleanupReport()
            clean_detector_folder(self.root, folder, report, self.keep)
            report.log()
        except OSError:
            logger.warning("cannot remove old versions", extra={"folder": str(folder)}, exc_info=True)
        return info

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
