"""The kept versions of a detector state and where each came from (an upload, a fit job, a rollback).

The last ``keep`` versions (``OOD_STATE_KEEP``, default 3) of a detector are kept: the active one and the
``keep - 1`` highest below it. Their description lives in the commit point itself, ``active.json``'s ``history``
list (oldest first, the active version last), so it is never out of step with the committed state:
``{"version", "sha256", "size_bytes", "detector_class", "created_at", "source", "job_id", "rollback_of"}``.
States written before histories existed have none: their kept files are described from the files (hashed, class
from the header, time from the file), with ``source`` ``"upload"``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ood_core.state import read_state_info

Source = Literal["upload", "fit", "rollback"]
SOURCES: tuple[str, ...] = ("upload", "fit", "rollback")
DEFAULT_KEEP = 3


@dataclass(frozen=True)
class VersionOrigin:
    """Where a new version comes from: an upload, the fit job ``job_id`` or a rollback to ``rollback_of``."""

    source: Source = "upload"
    job_id: str | None = None
    rollback_of: int | None = None


UPLOAD = VersionOrigin()


@dataclass(frozen=True)
class StoredVersion:
    """One kept version of a detector state."""

    version: int
    sha256: str
    size_bytes: int
    detector_class: str
    created_at: str
    source: Source = "upload"
    job_id: str | None = None
    rollback_of: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, entry: Any) -> StoredVersion | None:
        """The entry, or ``None`` if it is not a well-formed one (a history is advisory, never fatal)."""
        if not isinstance(entry, dict):
            return None
        try:
            source = entry.get("source", "upload")
            job_id, rollback_of = entry.get("job_id"), entry.get("rollback_of")
            return cls(
                version=int(entry["version"]),
                sha256=str(entry["sha256"]),
                size_bytes=int(entry["size_bytes"]),
                detector_class=str(entry["detector_class"]),
                created_at=str(entry["created_at"]),
                source=source if source in SOURCES else "upload",
                job_id=None if job_id is None else str(job_id),
                rollback_of=None if rollback_of is None else int(rollback_of),
            )
        except (KeyError, TypeError, ValueError):
            return None


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def kept_below(existing: list[int], active: int, keep: int) -> list[int]:
    """The versions kept besides ``active``: the ``keep - 1`` highest of ``existing`` below it."""
    below = sorted(v for v in existing if v < active)
    return below[len(below) - (keep - 1) :] if keep > 1 else []


def history_of(meta: dict[str, Any]) -> dict[int, StoredVersion]:
    """The history entries of an ``active.json``, by version."""
    entries = (StoredVersion.from_json(e) for e in meta.get("history") or [])
    return {e.version: e for e in entries if e is not None}


def active_entry(meta: dict[str, Any]) -> StoredVersion:
    """The active version as a history entry (its own one if the history has it)."""
    own = history_of(meta).get(int(meta["version"]))
    if own is not None:
        return own
    return StoredVersion(
        version=int(meta["version"]),
        sha256=str(meta["sha256"]),
        size_bytes=int(meta["size_bytes"]),
        detector_class=str(meta["detector_class"]),
        created_at=str(meta["uploaded_at"]),
    )


def from_file(path: Path, version: int) -> StoredVersion:
    """Describe a kept version file that no history names (written before histories existed)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    try:
        cls = read_state_info(path).cls
    except Exception:  # an unreadable header: still listed, as what it is
        cls = "unknown"
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    return StoredVersion(version, digest.hexdigest(), size, cls, created)
