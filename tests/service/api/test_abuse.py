"""Abuse: failed authentication is rate-limited per client address; error bodies carry no memory addresses,
object reprs or server paths; an unexpected error closes the connection and says so."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from service.api.auth import FailureLimiter
from service.api.problems import Redactor
from service.errors import TooManyFailedAuthenticationsError
from service.settings import Settings
from tests.service.conftest import AUTH, serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def url(module_settings: Settings) -> Iterator[str]:
    with serve(module_settings.model_copy(update={"auth_failures_per_minute": 5})) as base:
        yield base


def from_address(url: str, address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (any 127.x.y.z is this machine)."""
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=30)


def test_wrong_keys_from_one_address_are_cut_off_with_429_and_retry_after(url: str) -> None:
    target = "/v1/models/digits/detectors/never"
    with from_address(url, "127.0.0.2") as guesser, from_address(url, "127.0.0.3") as other:
        statuses = [
            guesser.delete(target, headers={"Authorization": f"Bearer guess-{i}"}).status_code for i in range(5)
        ]
        assert statuses == [403] * 5
        blocked = guesser.delete(target, headers=AUTH)  # even the right key waits now
        assert blocked.status_code == 429 and blocked.headers["content-type"] == "application/problem+json"
        assert 1 <= int(blocked.headers["retry-after"]) <= 60 and "failed authentications" in blocked.json()["detail"]
        assert guesser.get("/v1/models").status_code == 200  # reads need no key: not affected
        assert other.delete(target, headers=AUTH).status_code == 404  # another address is not affected


def test_the_window_slides() -> None:
    limiter = FailureLimiter(per_minute=2, window_s=0.2)
    limiter.failed("a")
    limiter.failed("a")
    with pytest.raises(TooManyFailedAuthenticationsError) as caught:
        limiter.check("a")
    assert 0 < caught.value.retry_after_s <= 0.2
    limiter.check("b")
    time.sleep(0.25)
    limiter.check("a")  # the failures left the window


def test_tracked_addresses_are_bounded() -> None:
    limiter = FailureLimiter(per_minute=1, max_clients=3)
    for client in "abcd":
        limiter.failed(client)
    limiter.check("a")  # the least recently failed address was dropped
    with pytest.raises(TooManyFailedAuthenticationsError):
        limiter.check("d")


@pytest.mark.parametrize(
    ("message", "leaked"),
    [
        ("cannot load: <torch.Tensor object at 0x7f3a2b1c9d50> bad", "0x7f3a2b1c9d50"),
        ("state in /srv/states/digits/knn/v3.safetensors is bad", "/srv/states"),
        ("opened /usr/lib/python3.11/json/decoder.py line 3", "/usr/lib"),
        ("id 0x7fabcdef1234 freed", "0x7fabcdef1234"),
    ],
)
def test_redaction_removes_addresses_reprs_and_paths(message: str, leaked: str) -> None:
    redacted = Redactor(["/srv/states"])(message)
    assert leaked not in redacted and ("<" in redacted)


def test_redaction_keeps_what_a_client_needs() -> None:
    message = "model 'digits' is a classification model: /segment is for segmentation; use /score"
    assert Redactor(["/srv/states"])(message) == message


def test_an_unexpected_error_closes_the_connection_and_says_so(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api.routes import models

    def broken(model: object) -> object:
        raise RuntimeError("secret internals at 0xdeadbeef")

    monkeypatch.setattr(models, "model_info", broken)
    with serve(make_settings()) as base, httpx.Client(base_url=base) as client:
        answer = client.get("/v1/models/digits")
        assert answer.status_code == 500 and answer.headers["connection"] == "close"
        assert "secret" not in answer.text and "0xdeadbeef" not in answer.text
        assert answer.headers.get_list("server") == ["ood-serve"]
        assert client.get("/healthz").status_code == 200  # the pool opens a new connection
