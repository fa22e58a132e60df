"""Tar archives (``.tar``, ``.tar.gz`` / ``.tgz``, also bzip2 / xz) read member by member, never extracted.

:func:`iter_members` is the one reader of tar streams (class-folder tars here, WebDataset shards in
:mod:`service.fit.sources.shards`): it checks every member as its header arrives (path traversal and absolute
names, links and other non-regular members, the declared size, and for compressed archives the ratio of tar bytes
to compressed bytes read so far) and reads the data of only the members asked for, each on its own (bounded by
the member limit). Plain tars seek over the rest; compressed ones are decompressed as one stream.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from torch import Tensor

from service.fit.sources.base import (
    DataSourceError,
    FitSource,
    FolderLayout,
    SourceIndex,
    SourceLimits,
    check_member_name,
    common_root,
)

_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError)


class _CountingReader:
    """A file's ``read`` that counts the (compressed) bytes handed out."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.count += len(data)
        return data


def compression(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(6)
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def _check(info: tarfile.TarInfo, container: str, limits: SourceLimits) -> bool:
    """True for a regular member to consider, False for a folder; DataSourceError for anything refused."""
    name = check_member_name(info.name, container)
    member = f"{container}: {name}"
    if info.isdir():
        return False
    if info.issym() or info.islnk():
        raise DataSourceError(f"{member}: links are refused in archives")
    if not info.isreg():
        raise DataSourceError(f"{member}: not a regular file (devices, FIFOs... are refused)")
    if info.size > limits.max_member_bytes:
        raise DataSourceError(
            f"{member}: declared size {info.size} bytes exceeds the limit of {limits.max_member_bytes}"
        )
    return True


def _open_tar(raw: BinaryIO, counter: _CountingReader, kind: str | None) -> tarfile.TarFile:
    """Plain tars in random-access mode (headers are sought, data skipped), compressed ones as a stream."""
    if kind:
        return tarfile.open(fileobj=counter, mode=f"r|{kind}")  # type: ignore[call-overload]
    return tarfile.open(fileobj=raw, mode="r:")


def iter_members(
    path: Path, limits: SourceLimits, want: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data)`` of the regular members in stream order; ``data`` only for names ``want`` accepts
    (called once per member, in order), else ``None``."""
    container = str(path)
    try:
        kind = compression(path)
        with open(path, "rb") as raw:
            counter = _CountingReader(raw)
            with _open_tar(raw, counter, kind) as archive:
                while (info := archive.next()) is not None:
                    archive.members = []  # type: ignore[attr-defined]  # keep no TarInfo per member: flat memory
                    if not _check(info, container, limits):
                        continue
                    expanded = info.offset_data + info.size
                    ratio = expanded / max(counter.count, 1)
                    if kind and expanded > limits.ratio_floor_bytes and ratio > limits.max_compression_ratio:
                        raise DataSourceError(
                            f"{container}: {info.name}: compression ratio {ratio:.0f} so far exceeds the limit of "
                            f"{limits.max_compression_ratio:g}"
                        )
                    if want is None or not want(info.name):
                        yield info.name, None
                        continue
                    fh = archive.extractfile(info)
                    data = fh.read(limits.max_member_bytes + 1) if fh is not None else b""
                    if len(data) > limits.max_member_bytes:
                        raise DataSourceError(f"{container}: {info.name}: more than {limits.max_member_bytes} bytes")
                    yield info.name, data
    except DataSourceError:
        raise
    except _READ_ERRORS as exc:
        raise DataSourceError(f"{container}: not a readable tar archive (corrupt or truncated?): {exc}") from exc


class TarSource(FitSource):
    """A class-folder tree inside a tar archive (optionally under one top-level folder)."""

    def __init__(self, path: Path, labels: Sequence[str], limits: SourceLimits, skip_invalid: bool) -> None:
        super().__init__(str(path), labels, limits, skip_invalid)
        self.path = path

    def scan(self, rank: int = 0, world: int = 1) -> SourceIndex:
        names = [name for name, _ in iter_members(self.path, self.limits)]
        if len(set(names)) != len(names):
            seen: set[str] = set()
            dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
            raise DataSourceError(f"{self.path}: member {dup!r} appears more than once")
        root = common_root(names, self.labels)
        layout = FolderLayout(self, str(self.path))
        for name in names:  # stream order: read() finds the members in the same order
            layout.add(name, name[len(root) :])
        return layout.index(rank, world, root)

    def read(self, index: SourceIndex, ordinals: Sequence[int]) -> Iterator[tuple[int, bytes | dict[str, Tensor]]]:
        wanted = {index.refs[o]: o for o in ordinals}
        remaining = len(wanted)
        if not remaining:
            return
        for name, data in iter_members(self.path, self.limits, want=wanted.__contains__):
            if data is None:
                continue
            yield wanted[name], data
            remaining -= 1
            if remaining == 0:
                return
