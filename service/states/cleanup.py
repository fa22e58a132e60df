"""Leftovers of interrupted state writes, how :meth:`service.states.store.StateStore.cleanup` removes them, and
the upload files' lock protocol that lets it tell a live upload from a dead one (:func:`open_upload`).

A write killed part-way (a crash, a SIGKILL, a power cut) can leave, besides the intact previous state:

* ``.<name>.XXXX.tmp`` files in a detector folder (an ``active.json`` being written),
* version files that were renamed into place but never committed by ``active.json`` (versions above the active
  one), or that a committed write had not removed yet (versions below the kept ones),
* a detector folder without ``active.json`` (its first write did not commit), and its lock file,
* ``.uploads/*.tmp`` files of uploads that were never consumed,
* ``.deleted-*`` folders of a delete that did not finish removing them.

The functions here assume the caller holds the detector's lock (:func:`clean_detector_folder`) or need no lock
(:func:`clean_uploads`: an upload in progress holds an exclusive ``flock`` on its file, and only files whose lock
can be taken without waiting are removed; :func:`clean_trash`: nothing refers to a renamed-away folder). The
active version and the kept earlier ones (the ``keep - 1`` highest below the active one,
:mod:`service.states.versions`) are never removed, nor is anything in a folder whose ``active.json`` cannot be read
(left for a person to look at). Model folders stay,
even empty ones: the service's start-up takes a missing model folder for a first start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from service.settings import is_valid_name
from service.states.versions import DEFAULT_KEEP, kept_below

ACTIVE = "active.json"
UPLOADS = ".uploads"
TRASH_PREFIX = ".deleted-"
_VERSION_FILE = re.compile(r"^v(\d+)\.safetensors$")
_LOCK_FILE = re.compile(r"^\.(.+)\.lock$")

logger = logging.getLogger("service.states")


@dataclass
class CleanupReport:
    """What a cleanup removed, as paths relative to the state directory."""

    temp_files: list[str] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    lock_files: list[str] = field(default_factory=list)
    trash: list[str] = field(default_factory=list)

    @property
    def removed(self) -> list[str]:
        return [*self.temp_files, *self.uploads, *self.versions, *self.folders, *self.lock_files, *self.trash]

    def log(self) -> None:
        if self.removed:
            logger.info(
                "removed leftovers of interrupted state writes",
                extra={k: v for k, v in vars(self).items() if v},
            )


@dataclass
class HeldLock:
    """A held detector lock; ``drop``: remove the lock file (while still holding it) when releasing."""

    lock_file: Path
    drop: bool = False


class Upload:
    """A state being streamed into the store: write its chunks to :attr:`file`, then pass :attr:`path` to
    :meth:`~service.states.store.StateStore.put_file`. Do not rename or remove the file yourself."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self.file: BinaryIO = os.fdopen(os.dup(lock_fd), "wb")
        self.lock_fd = lock_fd
        """Holds the upload's ``flock`` (a descriptor of its own: closing :attr:`file` does not release it)."""


def open_upload(folder: Path) -> Upload:
    """A new upload file in ``folder``, created, then locked with an exclusive ``flock`` (the other half of
    :func:`clean_uploads`: a cleanup that locked the file between its creation and our lock removed it, so we
    check that the path still names our file and otherwise make another one)."""
    while True:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".tmp")
        path = Path(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only for a cleanup that took it first (it removes the file)
            if same_file(fd, path):
                return Upload(path, fd)
        except BaseException:
            with suppress(OSError):
                if same_file(fd, path):
                    path.unlink()
            os.close(fd)
            raise
        os.close(fd)


def close_upload(upload: Upload) -> None:
    """Remove the upload file unless it was consumed (renamed away), while still locked; then unlock."""
    try:
        if same_file(upload.lock_fd, upload.path):
            upload.path.unlink()
    finally:
        with suppress(OSError):
            upload.file.close()
        os.close(upload.lock_fd)


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it was neither removed nor replaced)."""
    opened = os.fstat(fd)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)


def versions(folder: Path) -> list[int]:
    found = (_VERSION_FILE.match(p.name) for p in folder.iterdir()) if folder.is_dir() else iter(())
    return sorted(int(m.group(1)) for m in found if m)


def active_version(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / ACTIVE).read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kept_versions(folder: Path, keep: int = DEFAULT_KEEP) -> set[int] | None:
    """The active version and the ``keep - 1`` highest below it; ``None`` if ``active.json`` exists but cannot be
    read."""
    active = active_version(folder)
    if active is None:
        return None if (folder / ACTIVE).exists() else set()
    return {active, *kept_below(versions(folder), active, keep)}


def detector_names(model_folder: Path) -> list[str]:
    """Detectors of a model folder that have a folder or a lock file."""
    names = set()
    for entry in model_folder.iterdir():
        match = _LOCK_FILE.match(entry.name)
        name = match.group(1) if match and entry.is_file() else entry.name if entry.is_dir() else ""
        if is_valid_name(name):
            names.add(name)
    return sorted(names)


def clean_detector_folder(root: Path, folder: Path, report: CleanupReport, keep: int = DEFAULT_KEEP) -> bool:
    """Remove the leftovers in one detector folder (the caller holds its lock); ``True`` if the folder is gone."""
    if not folder.is_dir():
        return True
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
            report.temp_files.append(str(entry.relative_to(root)))
    kept = kept_versions(folder, keep)
    if kept is None:
        logger.warning("unreadable active.json: folder left as it is", extra={"folder": str(folder.relative_to(root))})
        return False
    for version in versions(folder):
        if version not in kept:
            (folder / f"v{version}.safetensors").unlink(missing_ok=True)
            report.versions.append(str((folder / f"v{version}.safetensors").relative_to(root)))
    if not (folder / ACTIVE).exists():
        try:
            folder.rmdir()
        except OSError:  # not empty: files this store does not know, left alone
            return False
        report.folders.append(str(folder.relative_to(root)))
        return True
    return False


def clean_uploads(root: Path, report: CleanupReport) -> None:
    """Remove upload files no live upload holds (their ``flock`` can be taken without waiting)."""
    uploads = root / UPLOADS
    if not uploads.is_dir():
        return
    for entry in sorted(uploads.iterdir()):
        if not entry.name.endswith(".tmp"):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError):
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live upload, in this process or another one
            if same_file(fd, entry):  # not consumed or replaced meanwhile
                entry.unlink()
                report.uploads.append(str(entry.relative_to(root)))
        finally:
            os.close(fd)


def clean_trash(root: Path, model_folder: Path, report: CleanupReport) -> None:
    """Remove the folders of deletes that did not finish (renamed away, so no write or read refers to them)."""
    for entry in sorted(model_folder.iterdir()):
        if entry.name.startswith(TRASH_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            report.trash.append(str(entry.relative_to(root)))


def clean_root(
    root: Path, locked: Callable[[str, str], AbstractContextManager[HeldLock]], keep: int = DEFAULT_KEEP
) -> CleanupReport:
    """Clean the uploads and every detector folder under ``root``, each under ``locked(model, detector)``.

    A failure is logged and the rest still cleaned; model folders are left, even empty ones (their existence
    tells the service's start-up that a model's states were set up once)."""
    report = CleanupReport()
    if not root.is_dir():
        return report
    try:
        clean_uploads(root, report)
    except OSError:
        logger.warning("cannot clean up the uploads", exc_info=True)
    for base in sorted(root.iterdir()):
        if not (base.is_dir() and is_valid_name(base.name)):
            continue
        try:
            clean_trash(root, base, report)
            for name in detector_names(base):
                had_lock_file = (base / f".{name}.lock").exists()
                with locked(base.name, name) as held:
                    held.drop = clean_detector_folder(root, base / name, report, keep)
                if held.drop and had_lock_file:
                    report.lock_files.append(str(held.lock_file.relative_to(root)))
        except OSError:
            logger.warning("cannot clean up stored states", extra={"model": base.name}, exc_info=True)
    report.log()
    return report
