"""Where a fit job's data is and how it is opened: an uploaded archive or safetensors in the job's spool, a path
under ``OOD_FIT_DATA_ROOT``, or images sent with the request (written to the spool as one WebDataset shard).

A spooled upload is named by what its first bytes are (zip, gzip, plain tar; anything else is taken for a
safetensors of outputs), so :func:`service.fit.sources.open_source` picks the reader. A data-root path is resolved
with its symbolic links and must stay under the root; a folder's links are checked too before the job reads it
(the folder reader follows them), so nothing outside the root is reachable. Error messages name members relative
to what the client sent, never a server path.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from webdataset.shardlists import expand_urls

from service.engine.served_model import ServedModel
from service.errors import BadRequestError
from service.fit.sources import FitSource, SourceLimits, open_source
from service.fit.sources.base import IMAGE_SUFFIXES
from service.jobs.journal import JobJournal
from service.jobs.records import JobRecord
from service.settings import Settings

SNIFF_BYTES = 512
UPLOAD_NAMES = {
    ".zip": "upload.zip",
    ".tar.gz": "upload.tar.gz",
    ".tar": "upload.tar",
    ".safetensors": "upload.safetensors",
}
"""Spool file name per kind; also how error messages name the upload."""
IMAGES_NAME = "images.tar"
ARCHIVE_TYPES = {
    "application/zip": ".zip",
    "application/x-zip-compressed": ".zip",
    "application/x-tar": ".tar",
    "application/gzip": ".tar.gz",
    "application/x-gzip": ".tar.gz",
    "application/x-gtar": ".tar.gz",
    "application/x-compressed-tar": ".tar.gz",
    "application/x-safetensors": ".safetensors",
    "application/octet-stream": "",
}
"""Accepted raw body types -> the kind they announce ("": decided by the bytes)."""


def sniff_suffix(head: bytes, declared: str = "") -> str:
    """The kind of an upload from its first bytes; ``declared`` (a suffix) when they say nothing."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return ".zip"
    if head.startswith(b"\x1f\x8b"):
        return ".tar.gz"
    if head[257:262] == b"ustar":
        return ".tar"
    return declared or ".safetensors"


def suffix_of_name(filename: str) -> str:
    """The kind a file name announces (``digits.tgz`` -> ``.tar.gz``); "" when none."""
    name = filename.lower()
    for suffix, kind in ((".tar.gz", ".tar.gz"), (".tgz", ".tar.gz"), (".tar", ".tar"), (".zip", ".zip")):
        if name.endswith(suffix):
            return kind
    return ".safetensors" if name.endswith(".safetensors") else ""


def data_root_path(root: Path | None, relative: str) -> str | list[str]:
    """``relative`` under ``root`` as a path (or the expanded shard list of a brace / ``::`` pattern); 400 when
    there is no root, for absolute or escaping paths and for paths that do not exist."""
    if root is None:
        raise BadRequestError("fitting from a server path is off: the server sets no OOD_FIT_DATA_ROOT")
    if not relative or "\0" in relative or relative.startswith(("/", "\\")) or "://" in relative:
        raise BadRequestError(f"'source' must be a relative path under the data root, got {relative!r}")
    base = root.resolve()
    if "{" in relative or "::" in relative:
        return [_inside(base, part) for part in expand_urls(relative)]
    return _inside(base, relative)


def _inside(base: Path, relative: str) -> str:
    if PurePosixPath(relative).is_absolute() or relative.startswith("pipe:"):
        raise BadRequestError(f"'source' must be a relative path under the data root, got {relative!r}")
    try:
        resolved = (base / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadRequestError(f"source {relative!r}: no such file or directory under the data root") from None
    if not resolved.is_relative_to(base):
        raise BadRequestError(f"source {relative!r} is outside the data root")
    return str(resolved)


def check_tree_inside(base: Path, folder: Path) -> None:
    """Every folder and linked file reached from ``folder`` (following links, as the folder reader does) must be
    under ``base``; a BadRequestError names the first that is not."""
    base = base.resolve()
    for current, dirs, files in os.walk(folder, followlinks=True):
        here = Path(current)
        if not here.resolve().is_relative_to(base):
            raise BadRequestError(f"source: {here.relative_to(folder)} links outside the data root")
        for name in (*dirs, *files):
            entry = here / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(base):
                raise BadRequestError(f"source: {entry.relative_to(folder)} links outside the data root")


def write_image_shard(path: Path, images: Sequence[tuple[str, bytes]], labels: Sequence[int]) -> None:
    """Images and their labels (< 0: OOD) as one WebDataset shard: ``<n>.<ext>`` + ``<n>.cls`` per image."""
    with tarfile.open(path, "w") as shard:
        for number, ((name, data), label) in enumerate(zip(images, labels, strict=True)):
            suffix = PurePosixPath(name).suffix.lower()
            extension = suffix if suffix in IMAGE_SUFFIXES else ".png"  # decoding goes by the bytes, not the name
            for member, payload in ((f"{number:06d}{extension}", data), (f"{number:06d}.cls", str(label).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                shard.addfile(info, io.BytesIO(payload))


def job_data_path(record: JobRecord, settings: Settings, journal: JobJournal) -> str | list[str]:
    if record.data == "source":
        assert record.source is not None
        return data_root_path(settings.fit_data_root, record.source)
    assert record.spool is not None
    return str(journal.spool_root / record.spool)


def open_job_source(record: JobRecord, model: ServedModel, settings: Settings, journal: JobJournal) -> FitSource:
    """The fit source of a job, with the service's image limits (blocking: a folder source is walked)."""
    path = job_data_path(record, settings, journal)
    if isinstance(path, str) and Path(path).is_dir() and settings.fit_data_root is not None:
        check_tree_inside(settings.fit_data_root, Path(path))
    limits = SourceLimits(max_pixels=settings.max_pixels)
    return open_source(path, model.labels, limits=limits, skip_invalid=record.parameters.skip_invalid)


def public_message(message: str, record: JobRecord, settings: Settings, journal: JobJournal) -> str:
    """``message`` with the job's server paths replaced by what the client named: the upload's kind
    (``upload.zip``) or the path relative to the data root; the command-line option named as the job parameter."""
    replacements: list[tuple[str, str]] = []
    if record.spool is not None:
        replacements.append((str(journal.spool_root / record.spool), Path(record.spool).name))
    replacements.append((str(journal.spool_root) + "/", ""))
    if settings.fit_data_root is not None:
        for root in {str(settings.fit_data_root.resolve()), str(settings.fit_data_root)}:
            replacements.append((root.rstrip("/") + "/", ""))
    for old, new in replacements:
        message = message.replace(old, new)
    return message.replace("--skip-invalid", "skip_invalid=true")  # the fit engine words it for ood-fit
