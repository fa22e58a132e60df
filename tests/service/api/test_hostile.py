"""A generated hostile corpus over real HTTP (uvicorn on 127.0.0.1, the demo): every case answers a 200 with the
documented handling (``service/engine/decode.py``) or a 4xx ``application/problem+json`` whose ``detail`` says
why; never a 5xx; ``/healthz`` still answers after each case.

The last test runs the server as a subprocess (``python -m service``) and measures its resident memory
(``/proc/<pid>/status``) while four 25000 x 1000 images (each within the default 25e6-pixel limit, a few KB on the
wire) go to ``/segment``: the answer's maps must stay bounded, so the memory does too, and ``/healthz`` must keep
answering within a second meanwhile.

Every byte is built here.
"""

from __future__ import annotations

import base64
import io
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.demo import DEFAULT_DETECTOR
from tests.service.conftest import digit_png, noise_png, png_bytes, subprocess_server

pytestmark = pytest.mark.timeout(120)

SCORE = "/v1/models/digits/score"
SEGMENT = "/v1/models/digits-seg/segment"
SEG_INPUT = (64, 64)  # digits-seg's input size: the default size of its maps
MAX_IMAGES = 64  # the default max_images_per_request
PROBLEM = "application/problem+json"


# --- building the corpus ------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid ~60-byte PNG whose IHDR announces ``width x height`` 8-bit gray pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def digit_array(index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(digit_png(index))))


def digit_16bit_png() -> bytes:
    """The digit at 16 bits (v * 257): decoded as exactly the 8-bit digit."""
    return png_bytes(digit_array().astype(np.uint16) * 257)


def digit_palette_alpha_png() -> bytes:
    """The digit as a palette image (index = gray level) whose entry 0 is fully transparent WHITE: composited onto black
    it is the 8-bit digit again."""
    digit = digit_array()
    image = Image.new("P", (digit.shape[1], digit.shape[0]))
    image.putdata(digit.flatten().tolist())
    palette = [v for level in range(256) for v in (level, level, level)]
    palette[0:3] = [255, 255, 255]
    image.putpalette(palette)
    return encode(image, "PNG", transparency=0)


def digit_animated_gif() -> bytes:
    """First frame the digit, second frame noise: scored as the digit."""
    second = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8))
    return encode(Image.fromarray(digit_array()), "GIF", save_all=True, append_images=[second], duration=50, loop=0)


def cmyk_jpeg() -> bytes:
    cmyk = np.zeros((32, 32, 4), dtype=np.uint8)
    cmyk[8:24, 8:24] = (0, 0, 0, 0)  # white square
    cmyk[:8] = (0, 0, 0, 255)  # black band
    return encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=95)


def rotated_jpeg(orientation: int = 6) -> bytes:
    """Stored 48 wide x 24 high with EXIF orientation 6: served as 24 wide x 48 high."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.zeros((24, 48), dtype=np.uint8)
    stored[:8, :8] = 255
    return encode(Image.fromarray(stored), "JPEG", quality=90, exif=exif)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def noise_jpeg() -> bytes:
    return encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)), "JPEG")


def multipart(parts: list[tuple[str, bytes, str]], boundary: str = "hostile-boundary", close: bool = True) -> bytes:
    """``(filename, data, content type)`` parts named ``files``; ``close=False`` leaves out the close delimiter."""
    body = b""
    for filename, data, kind in parts:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                f"Content-Type: {kind}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    if close:
        body += f"--{boundary}--\r\n".encode()
    return body


@dataclass
class Case:
    name: str
    body: Callable[[], bytes]
    content_type: str = "multipart/form-data; boundary=hostile-boundary"
    status: int = 200
    detail: str = ""  # a 4xx: a substring of the problem's detail (case-insensitive)
    routes: tuple[str, ...] = (SCORE,)
    same_as_digit: bool = False  # a 200 on /score: scores identical to the 8-bit digit's (the documented handling)
    oriented_size: tuple[int, int] | None = None  # a 200 on /segment: answered (height, width)
    extra: dict[str, Any] = field(default_factory=dict)


def files(*parts: tuple[str, bytes, str]) -> Callable[[], bytes]:
    return lambda: multipart(list(parts))


def json_body(text: str) -> Callable[[], bytes]:
    return lambda: text.encode()


BOTH = (SCORE, SEGMENT)
JSON = "application/json"
CASES = [
    # undecodable or refused images: 4xx naming the image (its multipart filename)
    Case(
        "empty-file",
        files(("empty.png", b"", "image/png")),
        status=422,
        detail="empty.png: cannot decode image: empty file",
        routes=BOTH,
    ),
    Case(
        "truncated-png",
        files(("cut.png", truncated(noise_png(3, 64)), "image/png")),
        status=422,
        detail="cut.png: cannot decode",
        routes=BOTH,
    ),
    Case(
        "truncated-jpeg",
        files(("cut.jpg", truncated(noise_jpeg()), "image/jpeg")),
        status=422,
        detail="cut.jpg: cannot decode",
        routes=BOTH,
    ),
    Case(
        "decompression-bomb", files(("bomb.png", bomb_png(), "image/png")), status=413, detail="bomb.png", routes=BOTH
    ),
    Case(
        "text-as-image",
        files(("notes.png", b"hello, I am text\n" * 40, "image/png")),
        status=422,
        detail="notes.png: cannot decode",
        routes=BOTH,
    ),
    # decodable by the documented rules: 200
    Case("cmyk-jpeg", files(("cmyk.jpg", cmyk_jpeg(), "image/jpeg")), routes=BOTH, oriented_size=(32, 32)),
    Case(
        "palette-alpha-png",
        files(("p.png", digit_palette_alpha_png(), "image/png")),
        routes=BOTH,
        same_as_digit=True,
        oriented_size=(32, 32),
    ),
    Case(
        "animated-gif",
        files(("anim.gif", digit_animated_gif(), "image/gif")),
        routes=BOTH,
        same_as_digit=True,
        oriented_size=(32, 32),
    ),
    Case("exif-rotated-jpeg", files(("rot.jpg", rotated_jpeg(), "image/jpeg")), routes=BOTH, oriented_size=(48, 24)),
    Case(
        "16-bit-png",
        files(("wide.png", digit_16bit_png(), "image/png")),
        routes=BOTH,
        same_as_digit=True,
        oriented_size=(32, 32),
    ),
    # malformed bodies: 4xx saying what is wrong
    Case(
        "invalid-base64",
        json_body('{"instances": [{"b64": "not*base64!!"}]}'),
        JSON,
        422,
        "instances[0].b64 is not valid base64",
    ),
    Case(
        "b64-not-a-string", json_body('{"instances": [{"b64": 12345}]}'), JSON, 400, "instances[0] has no string 'b64'"
    ),
    Case("deeply-nested-json", json_body("[" * 100_000), JSON, 400, "JSON"),
    Case("json-not-an-object", json_body("[1, 2, 3]"), JSON, 400, "JSON body must be {'instances'"),
    Case("json-a-string", json_body('"instances"'), JSON, 400, "JSON body must be {'instances'"),
    Case("json-not-utf8", lambda: b'{"instances": "\xff\xfe"}', JSON, 400, "not valid JSON"),
    Case(
        "too-many-images",
        lambda: multipart([(f"d{i}.png", digit_png(0), "image/png") for i in range(MAX_IMAGES + 1)]),
        status=413,
        detail=f"{MAX_IMAGES + 1} images in one request; the limit is {MAX_IMAGES}",
    ),
    Case(
        "multipart-unclosed",
        lambda: multipart([("d.png", digit_png(0), "image/png")], close=False),
        status=400,
        detail="no closing boundary",
    ),
    Case("multipart-no-boundary", files(("d.png", digit_png(0), "image/png")), "multipart/form-data", 400, "boundary"),
    Case("text-plain-body", json_body("hello"), "text/plain", 415, "text/plain"),
]


# --- checking the answers ----------------------------------------------------------------------------------------


def check_problem(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith(PROBLEM), response.headers["content-type"]
    body = response.json()
    assert body["status"] == status and isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and detail.lower() in body["detail"].lower(), body["detail"]


def map_shape(encoded: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of an answered map, decoded."""
    if encoded["format"] == "json":
        rows = encoded["data"]
        return len(rows), len(rows[0]) if rows else 0
    data = base64.b64decode(encoded["data"])
    if encoded["format"] == "npy":
        shape = np.load(io.BytesIO(data), allow_pickle=False).shape
        return int(shape[0]), int(shape[1])
    image = Image.open(io.BytesIO(data))
    return image.height, image.width


def check_maps_bounded(response: httpx.Response, limit: tuple[int, int] = SEG_INPUT) -> None:
    """The answer is under 2 MB and each map at most the model input size (no ``?size=`` asked)."""
    assert response.status_code == 200, response.text[:500]
    assert len(response.content) < 2 * 1024 * 1024, f"segment answer of {len(response.content)} bytes"
    for result in response.json()["results"]:
        assert result["detectors"], "no detector answered a map"
        for name, verdict in result["detectors"].items():
            height, width = map_shape(verdict["map"])
            assert height <= limit[0] and width <= limit[1], f"{name}: map of {height}x{width} > {limit}"


@pytest.fixture
def client(live_server: str) -> Iterator[httpx.Client]:
    """A fresh client (connection) per case: a server that drops the connection after one case's 5xx must not fail
    the next."""
    with httpx.Client(base_url=live_server, timeout=60.0) as http:
        yield http


@pytest.fixture(scope="module")
def digit_scores(live_server: str) -> dict[str, float]:
    files = [("files", ("digit.png", digit_png(0), "image/png"))]
    response = httpx.post(f"{live_server}{SCORE}", files=files, timeout=60.0)
    assert response.status_code == 200, response.text
    return {k: v["score"] for k, v in response.json()["results"][0]["detectors"].items()}


PARAMS = [
    pytest.param(case, route, id=f"{case.name}-{route.rsplit('/', 1)[-1]}") for case in CASES for route in case.routes
]


@pytest.mark.parametrize(("case", "route"), PARAMS)
def test_hostile_case(client: httpx.Client, digit_scores: dict[str, float], case: Case, route: str) -> None:
    response = client.post(route, content=case.body(), headers={"Content-Type": case.content_type})
    if response.status_code >= 500:
        # no traceback: after a RecursionError in the server thread (deep JSON), CPython 3.11's ast.parse, which
        # pytest uses to show the failing source, can fail with "AST constructor recursion depth mismatch"
        pytest.fail(f"{case.name} on {route}: {response.status_code} {response.text[:300]}", pytrace=False)
    if case.status != 200:
        check_problem(response, case.status, case.detail)
    elif route == SCORE:
        assert response.status_code == 200, response.text[:500]
        (result,) = response.json()["results"]
        assert DEFAULT_DETECTOR["digits"] in result["detectors"]
        if case.same_as_digit:
            assert {k: v["score"] for k, v in result["detectors"].items()} == digit_scores
    else:
        check_maps_bounded(response)
        (result,) = response.json()["results"]
        if case.oriented_size is not None:
            assert (result["height"], result["width"]) == case.oriented_size
    health = client.get("/healthz", timeout=5.0)
    assert health.status_code == 200


def test_a_large_image_within_the_pixel_limit_gives_bounded_maps(client: httpx.Client) -> None:
    """5000 x 1000 noise (5e6 pixels, within the limit; ~5 MB of PNG) to /segment: 200, maps of the input size."""
    noise = np.random.default_rng(4).integers(0, 256, (1000, 5000), dtype=np.uint8)
    response = client.post(SEGMENT, files=[("files", ("wide.png", png_bytes(noise), "image/png"))])
    check_maps_bounded(response)
    assert (response.json()["results"][0]["height"], response.json()["results"][0]["width"]) == (1000, 5000)
    assert client.get("/healthz", timeout=5.0).status_code == 200


# --- memory of a real server process under the amplification case ------------------------------------------------

AMPLIFY_SHAPE = (1000, 25_000)  # height, width: 25e6 pixels, exactly the default limit
AMPLIFY_IMAGES = 4
RSS_GROWTH_LIMIT_MB = 300
"""Bound on the server's peak resident-memory growth while it answers the requests. What a bounded server needs:
the images are decoded one at a time, 25 MB each (8-bit gray), plus a transient copy in resizing; submit keeps the
opened (then decoded) images of a body under 64 KB alive until all are decoded: 4 x 25 MB = 100 MB; 64 x 64 maps
are kilobytes; allocator slack some tens of MB: about 150 MB, so 300 MB is twice that. Upsampling the maps to the
images' size instead needs 4 images x 3 detectors x 25e6 float32 = 1.2 GB before any encoding (and ~24 bytes per
pixel again as JSON), far over it."""
RSS_KILL_MB = 1500
"""The watchdog kills the server past this growth: the machine is shared, an unbounded answer may take many GB."""
HEALTH_LIMIT_S = 1.0


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS (``clear_refs`` 5, Linux >= 4.0); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def smooth_png(shape: tuple[int, int], seed: int) -> bytes:
    """A gray image that compresses to a few KB (rows of a repeated ramp), different per seed."""
    height, width = shape
    row = ((np.arange(width) * (seed + 1)) % 256).astype(np.uint8)
    return png_bytes(np.broadcast_to(row, (height, width)).copy())


class Monitor:
    """Samples the server's RSS every 20 ms (killing it past RSS_KILL_MB of growth) and times /healthz."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, baseline_kb: int) -> None:
        self.process, self.url, self.baseline_kb = process, url, baseline_kb
        self.peak_kb = baseline_kb
        self.killed = False
        self.health: list[tuple[float, int | None]] = []  # (seconds, status; None: no answer)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss, daemon=True), threading.Thread(target=self._healthz)]

    def __enter__(self) -> Monitor:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _rss(self) -> None:
        while not self._stop.is_set() and self.process.poll() is None:
            try:
                rss = proc_status_kb(self.process.pid, "VmRSS")
            except (OSError, KeyError):
                return
            self.peak_kb = max(self.peak_kb, rss)
            if rss - self.baseline_kb > RSS_KILL_MB * 1024:
                self.killed = True
                self.process.kill()
                return
            time.sleep(0.02)

    def _healthz(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as http:
            while not self._stop.is_set() and self.process.poll() is None:
                started = time.monotonic()
                try:
                    status: int | None = http.get("/healthz").status_code
                except httpx.HTTPError:
                    status = None
                self.health.append((time.monotonic() - started, status))
                time.sleep(0.05)


@pytest.fixture
def server_process(demo_state_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m service`` on a free loopback port with a copy of the demo states."""
    states = tmp_path / "states"
    shutil.copytree(demo_state_dir, states)
    with subprocess_server(states, tmp_path / "server.log", OOD_DEVICE="cpu", OOD_LOG_JSON="true") as (url, process):
        yield process, url


def test_segment_amplification_keeps_memory_bounded_and_health_answering(
    server_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = server_process
    images = [("files", (f"wide{i}.png", smooth_png(AMPLIFY_SHAPE, i), "image/png")) for i in range(AMPLIFY_IMAGES)]
    assert sum(len(f[1][1]) for f in images) < 1024 * 1024  # a small request...
    with httpx.Client(base_url=url, timeout=120.0) as http:
        warm = http.post(f"{SEGMENT}?format=json", files=[("files", ("d.png", digit_png(0), "image/png"))])
        assert warm.status_code == 200, warm.text[:500]  # lazy allocations of the route done before the baseline
        baseline_kb = proc_status_kb(process.pid, "VmRSS")
        hwm_reset = reset_peak_rss(process.pid)
        answers: dict[str, httpx.Response | str] = {}
        with Monitor(process, url, baseline_kb) as monitor:
            for fmt in ("json", "png"):
                try:
                    answers[fmt] = http.post(f"{SEGMENT}?format={fmt}", files=images)
                except httpx.HTTPError as error:
                    answers[fmt] = repr(error)
                if monitor.killed:
                    break
        after_kb = proc_status_kb(process.pid, "VmRSS") if process.poll() is None else -1
        peak_kb = monitor.peak_kb
        if hwm_reset and process.poll() is None:
            peak_kb = max(peak_kb, proc_status_kb(process.pid, "VmHWM"))
    growth_mb = (peak_kb - baseline_kb) / 1024
    slowest = max((s for s, _ in monitor.health), default=float("nan"))
    report = (
        f"baseline {baseline_kb / 1024:.0f} MB, peak growth {growth_mb:.0f} MB (VmHWM reset: {hwm_reset}), after "
        f"{after_kb / 1024:.0f} MB; answers {[(k, v if isinstance(v, str) else v.status_code) for k, v in answers.items()]}; "
        f"{len(monitor.health)} /healthz, slowest {slowest:.3f} s"
    )
    print(report)
    assert not monitor.killed, f"killed: RSS grew over {RSS_KILL_MB} MB ({report})"
    assert growth_mb < RSS_GROWTH_LIMIT_MB, report
    for fmt in ("json", "png"):
        answer = answers[fmt]
        assert isinstance(answer, httpx.Response), answer
        check_maps_bounded(answer)
    assert monitor.health, "no /healthz answer was timed"
    slow = [(round(s, 3), status) for s, status in monitor.health if status != 200 or s > HEALTH_LIMIT_S]
    assert not slow, f"/healthz slow or failing while /segment ran: {slow[:5]} of {len(monitor.health)}"
