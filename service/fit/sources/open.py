""":func:`open_source`: the fit source for a path (a folder, an archive, shards or precomputed outputs)."""

from __future__ import annotations

import itertools
import zipfile
from collections.abc import Sequence
from pathlib import Path

from service.fit.sources.base import DataSourceError, FitSource, SourceLimits
from service.fit.sources.folder import DirectorySource, ZipSource
from service.fit.sources.precomputed import OutputsSource
from service.fit.sources.shards import ShardSource
from service.fit.sources.tar import TarSource, compression, iter_members

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
FORMATS = "a folder, .zip, .tar, .tar.gz/.tgz, WebDataset shards (a brace pattern or '::' list) or .safetensors"
_PEEK_MEMBERS = 256


def _is_tar(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES) or (compression(path) is None and _plain_tar(path))


def _plain_tar(path: Path) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _holds_labels(path: Path, limits: SourceLimits) -> bool:
    """Whether a tar looks like a WebDataset shard: a ``.cls`` member among its first members."""
    names = itertools.islice(iter_members(path, limits), _PEEK_MEMBERS)
    return any(name.endswith(".cls") for name, _ in names)


def open_source(
    path: str | Path | Sequence[str | Path],
    labels: Sequence[str],
    *,
    limits: SourceLimits | None = None,
    skip_invalid: bool = False,
) -> FitSource:
    """The source for ``path``: a class-folder directory, a ``.zip`` / tar of one (class folders matched to
    ``labels``, ``ood/``: OOD), WebDataset shards (a brace pattern, a ``::``-separated list, a list of paths or a
    tar with ``.cls`` members) or a ``.safetensors`` of precomputed outputs. DataSourceError if it is none."""
    limits = limits or SourceLimits()
    if not isinstance(path, (str, Path)):
        return ShardSource([str(p) for p in path], labels, limits, skip_invalid)
    text = str(path)
    if isinstance(path, str) and ("{" in text or "::" in text):
        return ShardSource(text, labels, limits, skip_invalid)
    location = Path(path)
    if location.is_dir():
        return DirectorySource(location, labels, limits, skip_invalid)
    if not location.is_file():
        raise DataSourceError(f"{text}: no such file or directory")
    if location.suffix.lower() == ".safetensors":
        return OutputsSource(location, labels, limits, skip_invalid)
    if location.suffix.lower() == ".zip" or zipfile.is_zipfile(location):
        return ZipSource(location, labels, limits, skip_invalid)
    if _is_tar(location):
        if _holds_labels(location, limits):
            return ShardSource(text, labels, limits, skip_invalid)
        return TarSource(location, labels, limits, skip_invalid)
    raise DataSourceError(f"{text}: not a fit data source; expected {FORMATS}")
