"""Class-folder trees (torchvision's ImageFolder layout) on disk and in a ``.zip``, read member by member.

``<root>/<class>/**/<image>``: the class folder's name is matched to the model's ``labels``; ``ood/`` holds OOD
images (label -1, evaluation only). Hidden files and ``__MACOSX/`` are skipped, files that are not images (by
extension) are skipped with a warning, images outside a class folder are an error. A zip is never extracted: its
central directory is listed (names checked for path traversal, links, encryption, declared size and compression
ratio) and each member is decompressed on its own when read. A folder's symbolic links are followed (a folder of
links is a common way to build a subset); an archive's are refused.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

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


def read_limited(fh: IO[bytes], limit: int, member: str) -> bytes:
    """Read a member whose declared size was checked, refusing more bytes than ``limit`` anyway."""
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise DataSourceError(f"{member}: more than {limit} bytes (limit per member)")
    return data


class DirectorySource(FitSource):
    """A class-folder tree on disk."""

    def __init__(self, root: Path, labels: Sequence[str], limits: SourceLimits, skip_invalid: bool) -> None:
        super().__init__(str(root), labels, limits, skip_invalid)
        self.root = root

    def _walk(self) -> list[str]:
        found: list[str] = []
        seen: set[tuple[int, int]] = set()
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:  # a link back up the tree
                dirs[:] = []
                continue
            seen.add((info.st_dev, info.st_ino))
            dirs.sort()
            relative = Path(folder).relative_to(self.root).as_posix()
            found.extend(name if relative == "." else f"{relative}/{name}" for name in files)
        return sorted(found)

    def scan(self, rank: int = 0, world: int = 1) -> SourceIndex:
        if not self.root.is_dir():
            raise DataSourceError(f"{self.root}: not a directory")
        layout = FolderLayout(self, str(self.root))
        for relative in self._walk():
            layout.add(relative, relative)
        index = layout.index(rank, world)
        for ref in index.refs:  # only this rank's share is stat'ed
            size = (self.root / ref).stat().st_size
            if size > self.limits.max_member_bytes:
                raise DataSourceError(
                    f"{self.root}: {ref}: {size} bytes exceeds the limit of {self.limits.max_member_bytes}"
                )
        return index

    def read(self, index: SourceIndex, ordinals: Sequence[int]) -> Iterator[tuple[int, bytes | dict[str, Tensor]]]:
        for ordinal in ordinals:
            ref = index.refs[ordinal]
            member = f"{self.root}: {ref}"
            try:
                with open(self.root / ref, "rb") as fh:
                    yield ordinal, read_limited(fh, self.limits.max_member_bytes, member)
            except OSError as exc:
                raise DataSourceError(f"{member}: cannot read: {exc.strerror or exc}") from exc


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


class ZipSource(FitSource):
    """A class-folder tree inside a ``.zip`` (optionally under one top-level folder)."""

    def __init__(self, path: Path, labels: Sequence[str], limits: SourceLimits, skip_invalid: bool) -> None:
        super().__init__(str(path), labels, limits, skip_invalid)
        self.path = path

    def _open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataSourceError(f"{self.path}: not a readable zip archive: {exc}") from exc

    def _check(self, info: zipfile.ZipInfo) -> None:
        member = f"{self.path}: {info.filename}"
        limits = self.limits
        if _is_link(info):
            raise DataSourceError(f"{member}: links are refused in archives")
        if info.flag_bits & 0x1:
            raise DataSourceError(f"{member}: encrypted members are not supported")
        if info.file_size > limits.max_member_bytes:
            raise DataSourceError(
                f"{member}: declared size {info.file_size} bytes exceeds the limit of {limits.max_member_bytes}"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limits.ratio_floor_bytes and ratio > limits.max_compression_ratio:
            raise DataSourceError(
                f"{member}: compression ratio {ratio:.0f} exceeds the limit of {limits.max_compression_ratio:g}"
            )

    def scan(self, rank: int = 0, world: int = 1) -> SourceIndex:
        with self._open() as archive:
            infos = [i for i in archive.infolist() if not i.is_dir()]
        names = [check_member_name(i.filename, str(self.path)) for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DataSourceError(f"{self.path}: member {dup!r} appears more than once")
        for info in infos:
            self._check(info)
        root = common_root(names, self.labels)
        layout = FolderLayout(self, str(self.path))
        for name in sorted(names):
            layout.add(name, name[len(root) :])
        return layout.index(rank, world, root)

    def read(self, index: SourceIndex, ordinals: Sequence[int]) -> Iterator[tuple[int, bytes | dict[str, Tensor]]]:
        with self._open() as archive:
            for ordinal in ordinals:
                ref = index.refs[ordinal]
                member = f"{self.path}: {ref}"
                try:
                    info = archive.getinfo(ref)
                    self._check(info)
                    with archive.open(info) as fh:
                        data = read_limited(fh, self.limits.max_member_bytes, member)
                except (OSError, KeyError, zipfile.BadZipFile, EOFError) as exc:
                    raise DataSourceError(f"{member}: cannot read: {exc}") from exc
                yield ordinal, data
