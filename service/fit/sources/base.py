"""What every fit source shares: the error, the limits, the index of a rank's share, member-name checks and the
mapping of class folders to the model's labels.

A source is read in two steps. :meth:`FitSource.scan` lists (and checks) this rank's share of the samples: one
:class:`SourceIndex` entry per sample, ``(key, label)`` in a fixed order, the *local ordinal* being the position
in it. :meth:`FitSource.read` then yields the raw bytes (or precomputed output rows) of any subset of those
ordinals, in worker processes (:mod:`service.fit.sources.loader`). The key of a sample is its path inside the
data set without the image extension (``3/img_0042``), the same for a folder, an archive of it and a WebDataset
shard holding it, so the seeded calibration hold-out (:mod:`service.fit.holdout`) is the same whatever the
container and whatever the number of ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from service.errors import BadRequestError

OOD_FOLDER = "ood"
"""Class folder whose images are out-of-distribution (label -1), used for evaluation only."""
OOD_LABEL = -1
MIB = 1024 * 1024

Image.init()
IMAGE_SUFFIXES = frozenset(ext.lower() for ext in Image.registered_extensions())
"""File extensions Pillow reads (``.png``, ``.jpg``, ...): the members taken as images."""


class DataSourceError(BadRequestError):
    """Bad fit data; the detail names the member (file, archive member or shard sample) and the reason."""

    title = "Bad fit data"


@dataclass(frozen=True)
class SourceLimits:
    """Refusals while scanning and reading a source (defaults fit ImageNet-like data).

    ``max_member_bytes``: declared (uncompressed) size of one member; ``max_compression_ratio``: uncompressed /
    compressed size of a zip member or of a compressed tar stream so far, checked once the uncompressed size is
    above ``ratio_floor_bytes`` (tiny members compress arbitrarily well); ``max_pixels``: pixels announced by an
    image header, refused before decoding; ``max_label_bytes``: a WebDataset ``.cls`` member."""

    max_member_bytes: int = 256 * MIB
    max_compression_ratio: float = 200.0
    ratio_floor_bytes: int = 1 * MIB
    max_pixels: int = 25_000_000
    max_label_bytes: int = 1024


@dataclass
class SourceIndex:
    """This rank's share of a source: per local ordinal the sample's key and label (< 0: OOD), plus whatever the
    source needs to read it again (``refs``: a member name, a row number...)."""

    keys: list[str]
    labels: Tensor
    refs: list[str] = field(default_factory=list)
    root: str = ""
    """Archive prefix stripped from member names (a single top-level folder that is not a class)."""
    rank: int = 0
    world: int = 1
    """The share this index is of (``scan(rank, world)``)."""

    def __len__(self) -> int:
        return len(self.keys)


class FitSource(ABC):
    """A data set to fit on: images (decoded by the served model's own path) or precomputed network outputs."""

    kind: Literal["images", "outputs"] = "images"
    outputs: tuple[str, ...] = ()
    """For ``kind == "outputs"``: the output kinds the file holds (``logits``, ``features``, ``feature_maps``)."""

    def __init__(self, description: str, labels: Sequence[str], limits: SourceLimits, skip_invalid: bool) -> None:
        self.description = description
        self.labels = list(labels)
        self.limits = limits
        self.skip_invalid = skip_invalid
        self.warnings: list[str] = []
        self._label_of = {name: i for i, name in enumerate(self.labels)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    def use_output(self, kind: str, dim: int) -> None:
        """For precomputed outputs: read ``kind`` (of feature dimension ``dim``); DataSourceError if the file has
        none that fits. Image sources are run through the model, so any kind is there."""
        return None

    @abstractmethod
    def scan(self, rank: int = 0, world: int = 1) -> SourceIndex:
        """List and check this rank's share (every ``world``-th sample from ``rank``, or every ``world``-th
        shard); raise :class:`DataSourceError` naming the first bad member."""

    @abstractmethod
    def read(self, index: SourceIndex, ordinals: Sequence[int]) -> Iterator[tuple[int, bytes | dict[str, Tensor]]]:
        """``(ordinal, encoded image bytes or a row of outputs)`` for the given local ordinals (ascending), in any
        order; runs in DataLoader worker processes."""

    # ------------------------------------------------------------------ shared helpers
    def class_label(self, folder: str, member: str) -> int:
        """Label of a class folder: its index in the model's labels, -1 for ``ood/``; else a DataSourceError
        listing the known classes."""
        label = self._label_of.get(folder)
        if label is not None:
            return label
        if folder == OOD_FOLDER:
            return OOD_LABEL
        raise DataSourceError(f"{member}: unknown class folder {folder!r}; the model's classes are {self.known()}")

    def known(self) -> str:
        shown = ", ".join(self.labels[:50])
        more = f", ... ({len(self.labels)} classes)" if len(self.labels) > 50 else ""
        return f"{shown}{more} (and {OOD_FOLDER}/ for OOD images)"

    def parse_cls(self, text: bytes, member: str) -> int:
        """A WebDataset ``.cls`` value: a class index (< 0: OOD) or a class name (``ood``: OOD)."""
        if len(text) > self.limits.max_label_bytes:
            raise DataSourceError(f"{member}: label of {len(text)} bytes (more than {self.limits.max_label_bytes})")
        value = text.decode("utf-8", errors="replace").strip()
        try:
            number = int(value)
        except ValueError:
            return self.class_label(value, member)
        if number < 0:
            return OOD_LABEL
        if number >= len(self.labels):
            raise DataSourceError(f"{member}: class index {number} but the model has {len(self.labels)} classes")
        return number


def check_member_name(name: str, container: str) -> str:
    """The member name as a relative POSIX path; DataSourceError for absolute names, drive letters, backslashes,
    NUL bytes or ``..`` components (path traversal), although nothing is ever extracted."""
    bad = (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or "\0" in name
        or (len(name) > 1 and name[1] == ":")
        or ".." in PurePosixPath(name).parts
    )
    if bad:
        raise DataSourceError(f"{container}: member {name!r}: absolute or path-traversal member names are refused")
    return name


def is_ignored(parts: Sequence[str]) -> bool:
    """Hidden files and folders (``.DS_Store``, ``.git/``) and macOS resource forks (``__MACOSX/``)."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def sample_key(relative: str) -> str:
    """``3/img_0042.png`` -> ``3/img_0042`` (WebDataset's key of the same file: everything before the first dot
    of the file name)."""
    head, _, tail = relative.rpartition("/")
    stem = tail.split(".", 1)[0]
    return f"{head}/{stem}" if head else stem


def common_root(names: Sequence[str], labels: Sequence[str]) -> str:
    """The single top-level folder of an archive of a class-folder tree (``digits/0/a.png`` -> ``digits/``),
    when it is not itself a class; else ``""``."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1:
        return ""
    top = next(iter(tops))
    if top in labels or top == OOD_FOLDER or not all(n.count("/") >= 2 for n in names):
        return ""
    return top + "/"


def labels_tensor(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int64) if values else torch.empty(0, dtype=torch.int64)


class FolderLayout:
    """Class-folder members of an archive or a directory -> index entries (shared by folder, zip and tar)."""

    def __init__(self, source: FitSource, container: str) -> None:
        self.source = source
        self.container = container
        self.keys: list[str] = []
        self.labels: list[int] = []
        self.refs: list[str] = []
        self.ignored: list[str] = []

    def add(self, name: str, relative: str) -> None:
        """``relative``: the member's path below the root (``0/a.png``); ``name``: how to read it again."""
        parts = relative.split("/")
        if is_ignored(parts):
            return
        if not is_image_name(relative):
            self.ignored.append(relative)
            return
        member = f"{self.container}: {relative}"
        if len(parts) < 2:
            raise DataSourceError(f"{member}: image not inside a class folder; expected <class>/<image>")
        self.labels.append(self.source.class_label(parts[0], member))
        self.keys.append(sample_key(relative))
        self.refs.append(name)

    def index(self, rank: int, world: int, root: str = "") -> SourceIndex:
        if self.ignored:
            self.source.warnings.append(
                f"{self.container}: ignored {len(self.ignored)} file(s) that are not images, e.g. {self.ignored[0]}"
            )
        if not self.keys:
            raise DataSourceError(f"{self.container}: no images found (expected <class>/<image> members)")
        take = slice(rank, None, world)
        return SourceIndex(self.keys[take], labels_tensor(self.labels[take]), self.refs[take], root, rank, world)
