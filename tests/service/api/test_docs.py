"""The docs pages render with no network: every script, style sheet and icon they load is served by the
service itself, and nothing they configure calls out (no online validator, no web fonts)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import NoLifespanClient, serve


class AssetLinks(HTMLParser):
    """Every ``src`` / ``href`` of the page, and every URL literal in its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for key, value in attrs if key in ("src", "href") and value]
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline.append(data)


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> NoLifespanClient:
    return NoLifespanClient(create_app(make_settings()))  # no lifespan needed: the pages do not wait for the models


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_service(client: NoLifespanClient, page: str) -> None:
    answer = client.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    links = AssetLinks()
    links.feed(answer.text)
    assert links.urls, "the page loads its assets"
    for url in links.urls:
        assert not urlparse(url).netloc, f"{page} loads {url} from another host"
        asset = client.get(urljoin(page, url))
        assert asset.status_code == 200 and len(asset.content) > 1000, url
    scripts = " ".join(links.inline)
    assert "http://" not in scripts and "https://" not in scripts
    assert "/openapi.json" in answer.text
    if page == "/docs":
        assert '"validatorUrl": null' in answer.text  # the badge would call validator.swagger.io
    else:
        assert "fonts.googleapis.com" not in answer.text


def test_the_swagger_ui_bundle_renders_openapi_3_1(client: NoLifespanClient) -> None:
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on."""
    bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    version = bundle.split('PACKAGE_VERSION:"', 1)[1].split('"', 1)[0]
    assert int(version.split(".")[0]) >= 5, version


def test_no_schema_or_docs_when_reads_need_a_key(make_settings: Callable[..., Settings]) -> None:
    client = NoLifespanClient(create_app(make_settings(require_auth_for_read=True)))
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/assets/swagger-ui-bundle.js"):
        assert client.get(path).status_code == 404, path


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
@pytest.mark.parametrize(
    ("page", "rendered"), [("/docs", 'class="opblock-summary-path"'), ("/redoc", 'id="operation/')]
)
def test_a_real_browser_renders_the_pages_with_every_other_host_unreachable(
    module_settings: Settings, page: str, rendered: str
) -> None:
    """Headless Chromium, told that no host but 127.0.0.1 exists, runs the page's scripts: the operations of the
    schema appear in the DOM."""
    with serve(module_settings) as url:
        dom = subprocess.run(
            [
                str(_chromium()),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"{url}{page}",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=True,
        ).stdout
    assert rendered in dom, dom[-2000:]
    assert "/v1/models/{model}/score" in dom and "/v1/models/{model}/segment" in dom
