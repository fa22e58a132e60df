"""The web console at ``/``: its files come from the service only (no CDN, enforced by its Content-Security-Policy),
and in a real headless Chromium (Debian's, driven by playwright) with every other host unreachable and reads
behind a key, a user can enter the key, score images (chosen and dropped) and read the verdicts, see a
segmentation anomaly map over its image with the OOD share the API gives, and the drift panel."""

from __future__ import annotations

import base64
import io
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from service.app import create_app
from service.settings import Settings
from tests.service.api.test_docs import AssetLinks
from tests.service.conftest import API_KEY, AUTH, NoLifespanClient, digit_png, noise_png, png_bytes, serve

pytestmark = pytest.mark.timeout(300)
CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
ASSET_TYPES = {"console/app.js": "text/javascript", "console/style.css": "text/css"}


def mosaic_png(side: int = 256) -> bytes:
    """A 64x64 digits mosaic with one near-OOD digit (6-9) in a quadrant, enlarged to ``side`` pixels."""
    from ood_core.data import make_mosaics

    images, labels = make_mosaics(1, ood_share=1.0, seed=3)
    assert bool((labels[0] < 0).any())
    pixels = (images[0, 0].numpy() * 255).round().astype(np.uint8)
    return png_bytes(np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("require_auth_for_read", [False, True])
def test_the_page_and_its_assets_come_from_the_service(
    make_settings: Callable[..., Settings], require_auth_for_read: bool
) -> None:
    """Served without a key even when reads need one (the files hold no data); the API still asks for it."""
    client = NoLifespanClient(create_app(make_settings(require_auth_for_read=require_auth_for_read)))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    links = AssetLinks()
    links.feed(page.text)
    assert set(ASSET_TYPES) <= set(links.urls)
    for url in links.urls:
        if url.startswith("data:") or url == "docs":
            continue
        assert not urlparse(url).netloc, f"the console loads {url} from another host"
        asset = client.get(urljoin("/", url))
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(ASSET_TYPES[url]), url
        assert not re.search(r"https?://", asset.text), f"{url} names another host"
    missing = client.get("/console/secret.txt")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    if require_auth_for_read:
        assert client.get("/v1/models").status_code == 401


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(module_settings: Settings) -> Iterator[str]:
    with serve(module_settings.model_copy(update={"require_auth_for_read": True})) as url:
        yield url


def _open(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A new page of the console; collects requests to other hosts and script errors into the list."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on(
        "request",
        lambda request: (
            problems.append(f"request to {request.url}")
            if not request.url.startswith((url, "blob:", "data:"))
            else None
        ),
    )
    page.goto(f"{url}/")
    return page, problems


def _drop(page: Page, selector: str, name: str, data: bytes) -> None:
    """Drop a file on ``selector`` the way a browser does (a ``drop`` event with a ``DataTransfer``)."""
    page.evaluate(
        """([selector, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            const event = new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
            document.querySelector(selector).dispatchEvent(event);
        }""",
        [selector, name, base64.b64encode(data).decode()],
    )


@needs_chromium
def test_a_user_enters_the_key_scores_images_and_reads_verdicts_and_drift(browser: Browser, server: str) -> None:
    expect.set_options(timeout=30_000)
    page, problems = _open(browser, server)
    expect(page.locator("#status")).to_contain_text("API key")
    expect(page.locator("#docs-link")).to_have_count(0)  # /docs is not served when reads need a key
    page.fill("#key", API_KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#model option")).to_have_count(2)
    page.select_option("#model", "digits")

    page.set_input_files("#files", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": noise_png(7)}])
    noise = page.locator('article.result[data-file="noise.png"]')
    expect(noise.locator('tr[data-detector="mahalanobis"] .verdict')).to_have_text("OOD")
    _drop(page, "#drop", "digit.png", digit_png(0))
    digit = page.locator('article.result[data-file="digit.png"]')
    expect(digit.locator('tr[data-detector="mahalanobis"] .verdict')).to_have_text("ID")
    truth = httpx.post(
        f"{server}/v1/models/digits/score", files={"files": ("d.png", digit_png(0), "image/png")}, headers=AUTH
    ).json()["results"][0]
    expected = f"prediction {truth['prediction']['label']} ({100 * truth['prediction']['probability']:.1f}%)"
    expect(digit.locator(".prediction")).to_have_text(expected)
    p_value = digit.locator('tr[data-detector="mahalanobis"] td').nth(4).inner_text()
    assert float(p_value) == pytest.approx(truth["detectors"]["mahalanobis"]["p_value"], abs=1e-4)

    page.click("#refresh-drift")
    window = _window(server)
    expect(page.locator('#drift tr[data-detector="mahalanobis"] .filled')).to_have_text(f"3 / {window}")
    page.reload()
    expect(page.locator("#model option")).to_have_count(2)  # the key is kept for the tab
    assert not problems, problems
    page.close()


def _window(server: str) -> int:
    drift = httpx.get(f"{server}/v1/models/digits/drift", headers=AUTH).json()
    window: int = drift["detectors"]["mahalanobis"]["window"]
    return window


@needs_chromium
def test_a_segmentation_map_is_drawn_over_its_image_with_the_ood_share(
    browser: Browser, server: str, tmp_path: Path
) -> None:
    expect.set_options(timeout=30_000)
    page, problems = _open(browser, server)
    page.fill("#key", API_KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#model option")).to_have_count(2)
    page.select_option("#model", "digits-seg")
    image = mosaic_png()
    page.set_input_files("#files", files=[{"name": "mosaic.png", "mimeType": "image/png", "buffer": image}])
    figure = page.locator('figure[data-detector="energy"]')
    expect(figure.locator(".ood-share")).to_contain_text("OOD share")
    truth = httpx.post(
        f"{server}/v1/models/digits-seg/segment?size=256x256&format=npy&detectors=energy",
        files={"files": ("m.png", image, "image/png")},
        headers=AUTH,
    ).json()["results"][0]["detectors"]["energy"]
    assert 0 < truth["ood_share"] < 0.5
    expect(figure.locator(".ood-share")).to_have_text(f"OOD share {100 * truth['ood_share']:.1f}%")
    colours = figure.locator("canvas.overlay").evaluate(
        """(canvas) => {
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            const seen = new Set();
            for (let i = 0; i < data.length; i += 4) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
            return [canvas.width, canvas.height, seen.size];
        }"""
    )
    assert colours[:2] == [256, 256] and colours[2] > 200, colours  # the heat map blends over the image
    shot = tmp_path / "console-segmentation.png"
    page.locator("article.result").screenshot(path=str(shot))
    with Image.open(io.BytesIO(shot.read_bytes())) as picture:
        assert picture.format == "PNG" and picture.width >= 256
    assert not problems, problems
    page.close()
