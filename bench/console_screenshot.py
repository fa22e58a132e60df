"""Make ``docs/console-segmentation.png``: the web console (``/``) with the demo segmenter's anomaly maps drawn over
a digits mosaic that holds one near-OOD digit (6-9), shot in Debian's headless Chromium driven by playwright.

The demo service runs in this process on a free 127.0.0.1 port with a temporary state directory (its detectors
are fitted at start, a few seconds); every host but 127.0.0.1 is unreachable to the browser. Usage::

    python bench/console_screenshot.py                       # writes docs/console-segmentation.png
    python bench/console_screenshot.py --out /tmp/shot.png --chromium /usr/bin/chromium
"""

from __future__ import annotations

import argparse
import io
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image
from playwright.sync_api import FilePayload, FloatRect, sync_playwright

from ood_core.data import make_mosaics
from service.app import create_app
from service.server import uvicorn_config
from service.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def mosaic_png(side: int = 256, seed: int = 3) -> bytes:
    """A seeded 64x64 mosaic of test digits with one near-OOD digit, enlarged to ``side`` pixels."""
    images, _ = make_mosaics(1, ood_share=1.0, seed=seed)
    pixels = (images[0, 0].numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


def shoot(url: str, out: Path, chromium: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 800}, device_scale_factor=1)
        page.goto(f"{url}/")
        page.wait_for_selector("#model option[value='digits-seg']", state="attached")
        page.select_option("#model", "digits-seg")
        upload: FilePayload = {"name": "mosaic.png", "mimeType": "image/png", "buffer": mosaic_png()}
        page.set_input_files("#files", files=[upload])
        page.wait_for_selector("figure[data-detector] .ood-share")
        results = page.locator("#results").bounding_box()  # the page from its top down to the results
        assert results is not None
        clip: FloatRect = {"x": 0, "y": 0, "width": 1100, "height": results["y"] + results["height"] + 16}
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), clip=clip, full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console-segmentation.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as states, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = load_settings(state_dir=Path(states), log_level="WARNING")
        server = uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit("the demo service did not get ready")
            shoot(url, args.out, args.chromium)
        finally:
            server.should_exit = True
            thread.join(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
