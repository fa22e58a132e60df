"""WebDataset tar shards (PyPI ``webdataset``): ``<key>.jpg`` / ``<key>.png`` (any image extension Pillow reads)
+ ``<key>.cls`` per sample.

The shard list is a brace pattern or a ``::``-separated list, expanded by ``webdataset.shardlists.expand_urls``;
members are grouped into samples by ``webdataset.tariterators.group_by_keys`` (the key is the member name up to
the first dot of its file name). Members come from :func:`~service.fit.sources.tar.iter_members`, so shards get
the same checks as any archive (WebDataset's own reader skips links silently and reads members of any size).
``.cls`` holds a class index (< 0: OOD) or a class name (``ood``: OOD). Only local files: ``pipe:`` and URLs are
refused (a shard list must never run a command). Ranks take every ``world``-th shard when that splits the samples
evenly (as many shards for every rank, or at least 4 shards per rank); otherwise every rank reads every shard and
takes every ``world``-th sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from torch import Tensor
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys

from service.fit.sources.base import (
    IMAGE_SUFFIXES,
    DataSourceError,
    FitSource,
    SourceIndex,
    SourceLimits,
    labels_tensor,
)
from service.fit.sources.tar import iter_members

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", *sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
"""Image extensions of a sample, in order of preference when a sample has several."""


def expand_shards(spec: str | Sequence[str]) -> list[Path]:
    urls = expand_urls(spec) if isinstance(spec, str) else [u for s in spec for u in expand_urls(str(s))]
    shards = []
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            raise DataSourceError(f"{url}: only local shard files are read (no pipe: or URLs)")
        path = Path(url)
        if not path.is_file():
            raise DataSourceError(f"{url}: no such shard file")
        shards.append(path)
    if not shards:
        raise DataSourceError(f"{spec}: the shard pattern names no files")
    return shards


class _Counter:
    """Numbers samples as WebDataset groups them (a new sample when the key changes or a shard ends) and decides
    which members' data to read: the image and label members of wanted samples."""

    def __init__(self, step: int, offset: int, wanted: Callable[[int], bool], images: bool = True) -> None:
        self.step, self.offset, self.wanted, self.images = step, offset, wanted, images
        self.sample = -1
        self.key: str | None = None

    def new_shard(self) -> None:
        self.key = None

    def __call__(self, name: str) -> bool:
        key, suffix = base_plus_ext(name)
        if key is None:
            return False
        if key != self.key:
            self.key, self.sample = key, self.sample + 1
        if self.sample % self.step != self.offset or not self.wanted(self.sample // self.step):
            return False
        suffix = suffix.lower()
        return suffix == "cls" or (self.images and suffix in IMAGE_EXTENSIONS)


class ShardSource(FitSource):
    """A list of WebDataset shards."""

    def __init__(
        self, spec: str | Sequence[str], labels: Sequence[str], limits: SourceLimits, skip_invalid: bool
    ) -> None:
        description = spec if isinstance(spec, str) else "::".join(str(s) for s in spec)
        super().__init__(description, labels, limits, skip_invalid)
        self.shards = expand_shards(spec)

    def _share(self, rank: int, world: int) -> tuple[list[Path], int, int]:
        count = len(self.shards)
        if count >= world and (count % world == 0 or count >= 4 * world):  # shares within a shard of each other
            return self.shards[rank::world], 1, 0
        return self.shards, world, rank

    def _samples(self, shards: list[Path], counter: _Counter) -> Iterator[dict[str, object]]:
        """Samples of ``shards`` (data read for the members ``counter`` wants), numbered like ``counter``."""

        def files() -> Iterator[dict[str, object]]:
            for shard in shards:
                counter.new_shard()
                for name, data in iter_members(shard, self.limits, want=counter):
                    yield {"fname": name, "data": data if data is not None else b"", "__url__": str(shard)}
                yield {}  # end of shard: WebDataset never groups members of two shards into one sample

        try:
            yield from group_by_keys(files())
        except ValueError as exc:  # webdataset's "duplicate file name in tar file"
            raise DataSourceError(f"{self.description}: {exc}") from exc

    def scan(self, rank: int = 0, world: int = 1) -> SourceIndex:
        shards, step, offset = self._share(rank, world)
        if step > 1:
            self.warnings.append(
                f"{len(self.shards)} shard(s) for {world} ranks: every rank reads every shard (give a multiple of "
                f"{world} shards, or at least {4 * world}, for each rank to read only its own)"
            )
        keys: list[str] = []
        labels: list[int] = []
        count = 0
        for sample in self._samples(shards, _Counter(step, offset, lambda _: True, images=False)):
            mine = count % step == offset
            count += 1
            if not mine:
                continue
            member = f"{sample['__url__']}: {sample['__key__']}"
            if "cls" not in sample:
                raise DataSourceError(f"{member}: sample has no .cls label")
            if _image_extension(sample) is None:
                raise DataSourceError(f"{member}: sample has no image ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
            labels.append(self.parse_cls(sample["cls"], f"{member}.cls"))  # type: ignore[arg-type]
            keys.append(str(sample["__key__"]))
        if not keys:
            raise DataSourceError(f"{self.description}: no samples found")
        return SourceIndex(keys, labels_tensor(labels), rank=rank, world=world)

    def read(self, index: SourceIndex, ordinals: Sequence[int]) -> Iterator[tuple[int, bytes | dict[str, Tensor]]]:
        shards, step, offset = self._share(index.rank, index.world)
        wanted = set(ordinals)
        count = 0
        for sample in self._samples(shards, _Counter(step, offset, wanted.__contains__)):
            global_ordinal = count
            count += 1
            if global_ordinal % step != offset or global_ordinal // step not in wanted:
                continue
            ordinal = global_ordinal // step
            extension = _image_extension(sample)
            if extension is None or sample["__key__"] != index.keys[ordinal]:
                raise DataSourceError(
                    f"{sample['__url__']}: {sample['__key__']}: the shard changed since it was scanned"
                )
            yield ordinal, sample[extension]  # type: ignore[misc]


def _image_extension(sample: dict[str, object]) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
