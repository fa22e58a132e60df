"""The commit of a detector state write and the file-system steps it is made of (see :mod:`service.states.store`).

The upload file is flushed, fsynced and hashed in chunks (:func:`sync_and_hash`); under the detector's lock it is
renamed into place as the next version, the folder fsynced, ``active.json`` atomically replaced (the commit point)
with the kept versions' history, then older versions removed (:func:`commit_version`). The same bytes as the active
version change nothing (:func:`identical`). A full volume (``ENOSPC``, ``EDQUOT``) is :func:`no_space` (507).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ood_core.state import write_atomic
from service.engine.active import StoredState
from service.errors import InsufficientStorageError
from service.states.cleanup import (
    ACTIVE,
    CleanupReport,
    HeldLock,
    Upload,
    active_version,
    clean_detector_folder,
    same_file,
    versions,
)
from service.states.versions import StoredVersion, VersionOrigin, history_of, kept_below, utc_now

STORED_FIELDS = ("version", "sha256", "size_bytes", "detector_class", "uploaded_at")
"""The keys of ``active.json`` that make a :class:`~service.engine.active.StoredState`."""
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
CHUNK = 1 << 20
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


def no_space(what: str) -> InsufficientStorageError:
    return InsufficientStorageError(f"not enough storage for {what}: the state volume is full")


def sync_and_hash(path: Path, uploads: Iterable[Upload]) -> tuple[str, int]:
    """sha256 and size of the upload file ``path``, after flushing, closing and fsyncing it (through the one of the
    open ``uploads`` it is, when it is one)."""
    with open(path, "rb") as handle:
        # the upload by file, not by name: a relative or differently spelled path must not skip its flush
        live = next((u for u in uploads if same_file(u.lock_fd, path)), None)
        if live is not None:
            if not live.file.closed:
                live.file.flush()
                live.file.close()  # a later write fails instead of reaching the committed version
            os.fsync(live.lock_fd)  # the descriptor the data was written through: it sees writeback errors
        else:
            os.fsync(handle.fileno())
        digest, size = hashlib.sha256(), 0
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def identical(folder: Path, digest: str) -> StoredState | None:
    """The active state if its bytes are ``digest`` (and its file is there), else ``None`` (lock held)."""
    try:
        meta = json.loads((folder / ACTIVE).read_text(encoding="utf-8"))
        if meta.get("sha256") != digest or not (folder / f"v{int(meta['version'])}.safetensors").is_file():
            return None
        return StoredState(model=folder.parent.name, name=folder.name, **{k: meta[k] for k in STORED_FIELDS})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def commit_version(
    root: Path, keep: int, held: HeldLock, folder: Path, path: Path, file: tuple[str, int, str], origin: VersionOrigin
) -> StoredState:
    """Rename ``path`` (``file``: its sha256, size and detector class) into place as the next version, then
    commit it by ``active.json`` with the kept versions' history, keeping ``keep`` versions (lock held)."""
    digest, size, cls = file
    created = not folder.is_dir()
    target: Path | None = None
    if not created and (same := identical(folder, digest)) is not None:
        return same
    try:
        if created:
            folder.mkdir()
            fsync_dir(folder.parent)
            fsync_dir(root)
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
        earlier = kept_below(versions(folder), info.version, keep)
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
        clean_detector_folder(root, folder, report, keep)
        report.log()
    except OSError:
        logger.warning("cannot remove old versions", extra={"folder": str(folder)}, exc_info=True)
    return info
