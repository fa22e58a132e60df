"""The traffic of ``bench/soak.py``: the request mix of its virtual users, what they check in each answer and how it
is recorded.

Each user draws its requests from a seeded mix (:data:`MIX`): mostly ``/score`` with 1-4 images (multipart or JSON
base64), some ``/segment`` in each map format, the model and detector lists, ``/metrics``, ``/healthz``, state
downloads and at most one upload every :data:`UPLOAD_INTERVAL_S` s over all users (:class:`UploadClock`). An
answer is *undesigned* (:func:`judge`) unless it is the route's success status with the right number of results
or a designed overload answer (:data:`DESIGNED_STATUSES`); :class:`Recorder` counts every outcome per route and
keeps the latencies after the warm-up and the first few undesigned outcomes.
"""

from __future__ import annotations

import base64
import io
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

API_KEY = "soak-key-0123456789abcdef"
DESIGNED_STATUSES = frozenset({429, 503, 504})
"""Overload answers the service is designed to give (queue full, not ready / too many connections, expired)."""
UPLOAD_NAME = "soak-upload"
UPLOAD_INTERVAL_S = 10.0
MAX_ERROR_SAMPLES = 20
MIX: dict[str, int] = {
    "score": 60,
    "segment": 12,
    "models": 6,
    "detectors": 6,
    "metrics": 5,
    "healthz": 5,
    "download": 3,
    "upload": 3,  # at most one per UPLOAD_INTERVAL_S over all users; otherwise a score request is sent instead
}
"""Relative weights of the request kinds."""


def png(seed: int, height: int, width: int, channels: int = 1) -> bytes:
    """A random image, PNG-encoded (the service decodes and preprocesses it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Target:
    """What the users need to know about the server: its models, detectors and images for them."""

    url: str
    classifier: str
    segmenter: str
    detectors: dict[str, list[str]]
    score_images: list[bytes]
    segment_images: list[bytes]
    state: bytes
    """A downloaded state of the classifier (re-uploaded as UPLOAD_NAME)."""


def discover(url: str) -> Target:
    models = httpx.get(f"{url}/v1/models", timeout=30.0).json()["models"]
    classifier = next(m for m in models if m["task"] == "classification")
    segmenter = next(m for m in models if m["task"] == "segmentation")
    detectors = {m["name"]: sorted(m["detectors"]) for m in models}
    source = "msp" if "msp" in detectors[classifier["name"]] else detectors[classifier["name"]][0]
    state = httpx.get(f"{url}/v1/models/{classifier['name']}/detectors/{source}", timeout=30.0)
    state.raise_for_status()
    ch, cw = classifier["input_size"]
    sh, sw = segmenter["input_size"]
    return Target(
        url=url,
        classifier=classifier["name"],
        segmenter=segmenter["name"],
        detectors=detectors,
        score_images=[png(i, ch, cw) for i in range(4)] + [png(9, 2 * ch, cw + 5, channels=3)],
        segment_images=[png(10 + i, sh, sw) for i in range(2)] + [png(19, sh // 2, sw, channels=3)],
        state=state.content,
    )


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Planned:
    route: str
    method: str
    path: str
    ok: frozenset[int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    results: int | None = None
    """Expected ``len(answer["results"])`` of a 200, when the route has results."""


class Planner:
    """Draws the next request of one virtual user (seeded, so a run is reproducible up to timing)."""

    def __init__(self, target: Target, seed: int, uploads: UploadClock) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.kinds = list(MIX)
        self.weights = [MIX[k] for k in self.kinds]
        self.uploads = uploads

    def _images(self, pool: list[bytes], count: int) -> dict[str, Any]:
        chosen = [self.rng.choice(pool) for _ in range(count)]
        if self.rng.random() < 0.5:
            return {"json": {"instances": [{"b64": base64.b64encode(image).decode()} for image in chosen]}}
        return {"files": [("files", (f"image{i}.png", image, "image/png")) for i, image in enumerate(chosen)]}

    def next(self) -> Planned:
        target, rng = self.target, self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        if kind == "upload" and not self.uploads.take():
            kind = "score"
        if kind == "score":
            count = rng.randint(1, 4)
            path = f"/v1/models/{target.classifier}/score"
            return Planned("score", "POST", path, frozenset({200}), self._images(target.score_images, count), count)
        if kind == "segment":
            fmt = rng.choice(("png", "npy", "json"))
            count = rng.randint(1, 2)
            path = f"/v1/models/{target.segmenter}/segment?format={fmt}"
            kwargs = self._images(target.segment_images, count)
            return Planned(f"segment?format={fmt}", "POST", path, frozenset({200}), kwargs, count)
        if kind == "models":
            return Planned("models", "GET", "/v1/models", frozenset({200}))
        if kind == "detectors":
            model = rng.choice((target.classifier, target.segmenter))
            return Planned("detectors", "GET", f"/v1/models/{model}/detectors", frozenset({200}))
        if kind == "metrics":
            return Planned("metrics", "GET", "/metrics", frozenset({200}))
        if kind == "healthz":
            return Planned("healthz", "GET", "/healthz", frozenset({200}))
        if kind == "download":
            model = rng.choice((target.classifier, target.segmenter))
            name = rng.choice(target.detectors[model])
            return Planned("download", "GET", f"/v1/models/{model}/detectors/{name}", frozenset({200}))
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/octet-stream"}
        path = f"/v1/models/{target.classifier}/detectors/{UPLOAD_NAME}"
        return Planned("upload", "PUT", path, frozenset({200, 201}), {"content": target.state, "headers": headers})


class UploadClock:
    """At most one upload per ``interval_s`` over all users."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_at = 0.0

    def take(self) -> bool:
        now = time.monotonic()
        if now < self.next_at:
            return False
        self.next_at = now + self.interval_s
        return True


# ---------------------------------------------------------------------------------------------- recording
@dataclass
class RouteStats:
    statuses: Counter[str] = field(default_factory=Counter)
    """Status code (as a string) or ``exception`` -> count."""
    latencies: list[float] = field(default_factory=list)
    """Seconds, requests sent after the warm-up."""
    undesigned: int = 0


@dataclass
class Recorder:
    warmup_until: float
    routes: dict[str, RouteStats] = field(default_factory=dict)
    error_samples: list[dict[str, Any]] = field(default_factory=list)

    def record(self, planned: Planned, began: float, done: float, outcome: str, error: str | None) -> None:
        stats = self.routes.setdefault(planned.route, RouteStats())
        stats.statuses[outcome] += 1
        if began >= self.warmup_until:
            stats.latencies.append(done - began)
        if error is not None:
            stats.undesigned += 1
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(
                    {"route": planned.route, "method": planned.method, "path": planned.path, "outcome": outcome}
                    | {"error": error[:300], "at_s": round(began - self.warmup_until, 3)}
                )


def judge(planned: Planned, response: httpx.Response) -> str | None:
    """Why the answer is undesigned, or ``None`` when it is fine (success or a designed overload answer)."""
    status = response.status_code
    if status in DESIGNED_STATUSES:
        return None
    if status not in planned.ok:
        return f"status {status}: {response.text[:200]}"
    if planned.results is not None:
        try:
            results = response.json()["results"]
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable answer: {exc!r}"
        if len(results) != planned.results:
            return f"{len(results)} results for {planned.results} images"
    return None


async def virtual_user(
    client: httpx.AsyncClient, planner: Planner, recorder: Recorder, stop_at: float, alive: Callable[[], bool]
) -> None:
    while time.monotonic() < stop_at and alive():
        planned = planner.next()
        began = time.monotonic()
        try:
            response = await client.request(planned.method, planned.path, **planned.kwargs)
            outcome, error = str(response.status_code), judge(planned, response)
        except Exception as exc:  # every exception is an undesigned outcome: record it and go on
            outcome, error = "exception", f"{type(exc).__name__}: {exc}"
        recorder.record(planned, began, time.monotonic(), outcome, error)
