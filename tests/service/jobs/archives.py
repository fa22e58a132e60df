"""Fit data for the job tests: the digits as class folders (``0/`` .. ``5/``) plus ``ood/`` in a zip, a tar or a
folder, malformed archives, and a helper that waits for a job to end."""

from __future__ import annotations

import io
import tarfile
import time
import zipfile
from functools import lru_cache
from pathlib import Path

import httpx
import numpy as np

from tests.service.conftest import AppRunner, png_bytes


@lru_cache(maxsize=4)
def digit_members(per_class: int = 20, ood: int = 20, repeat: int = 1) -> tuple[tuple[str, bytes], ...]:
    """``(member name, PNG)`` pairs: ``per_class`` train digits of each class (each sent ``repeat`` times under
    different names) and ``ood`` uniform-noise images under ``ood/``."""
    from ood_core.data import load_split

    images, labels = load_split("train")
    members: list[tuple[str, bytes]] = []
    counts: dict[int, int] = {}
    for image, label in zip(images, labels.tolist(), strict=True):
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        png = png_bytes((image[0].numpy() * 255).round().astype(np.uint8))
        members.extend((f"{label}/{counts[label]:04d}-{r}.png", png) for r in range(repeat))
    noise, _ = load_split("uniform", num_far_ood=max(ood, 1))
    members.extend(
        (f"ood/{i:04d}.png", png_bytes((noise[i, 0].numpy() * 255).round().astype(np.uint8))) for i in range(ood)
    )
    return tuple(members)


def zip_of(members: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(members: list[tuple[str, bytes]], links: dict[str, str] | None = None, mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def digits_zip(per_class: int = 20, ood: int = 20, repeat: int = 1) -> bytes:
    return zip_of(digit_members(per_class, ood, repeat))


def write_folder(root: Path, members: tuple[tuple[str, bytes], ...]) -> Path:
    for name, data in members:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def wait_job(
    client: httpx.Client | AppRunner, job_id: str, timeout_s: float = 60.0, until: tuple[str, ...] = ()
) -> dict:
    """Poll ``/v1/jobs/{id}`` (an ``httpx.Client`` or an in-process ``AppRunner``) until the job has ended (or
    reached a state of ``until``); the job."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled", *until):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']} after {timeout_s} s: {job}"
        time.sleep(0.05)
