"""Slow and greedy clients over real sockets: a trickling head or body, oversized or too many headers, more
connections than allowed, a client gone mid-body. Each gets a designed answer (or none, when it is gone) within
the configured time, the server keeps serving, and no response says ``server: uvicorn``."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from urllib.parse import urlparse

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import digit_png, serve

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def url(module_settings: Settings) -> Iterator[str]:
    limits = {
        "header_timeout_s": 1.0,
        "max_header_bytes": 4096,
        "max_headers": 20,
        "body_grace_s": 1.0,
        "body_min_rate_kib_s": 64.0,
        "max_connections": 12,
    }
    with serve(module_settings.model_copy(update=limits)) as base:
        yield base


def connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=10)
    return sock


def read_response(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit_s`` passes)."""
    sock.settimeout(limit_s)
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def test_a_trickling_head_gets_408_and_is_closed_at_its_deadline(url: str) -> None:
    sock = connect(url)
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed at the deadline while we trickle
        for byte in b"X-Slow: 1":
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
    response = read_response(sock)
    elapsed = time.monotonic() - started
    assert status_of(response) == 408 and b"application/problem+json" in response
    assert b"connection: close" in response.lower() and elapsed < 5
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n", b"exceed 4096 bytes"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n",
            b"20 header",
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"b" * 600_000, b"exceed 4096 bytes"),
    ],
    ids=["one-big-header", "too-many-headers", "unterminated-huge-header"],
)
def test_oversized_or_too_many_headers_get_431(url: str, head: bytes, expected: bytes) -> None:
    sock = connect(url)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered while we were still sending
        sock.sendall(head)
    response = read_response(sock)
    assert status_of(response) == 431 and expected in response


def test_a_trickling_body_gets_408_with_connection_close(url: str) -> None:
    sock = connect(url)
    started = time.monotonic()
    sock.sendall(
        b"POST /v1/models/digits/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"instances": ['
    )
    response = read_response(sock)
    assert status_of(response) == 408 and b"did not arrive in time" in response
    assert b"connection: close" in response.lower() and time.monotonic() - started < 5


def test_past_the_connection_limit_a_new_connection_gets_503_at_once_and_the_rest_keep_working(url: str) -> None:
    with ExitStack() as stack:
        idle = [stack.enter_context(connect(url)) for _ in range(12)]  # 12 open: the limit is reached
        time.sleep(0.2)
        extra = stack.enter_context(connect(url))
        started = time.monotonic()
        response = read_response(extra, 3.0)
        assert status_of(response) == 503 and b"open connections" in response and time.monotonic() - started < 2
        idle[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(read_response(idle[0])) == 200  # an admitted connection is served
    metrics = httpx.get(f"{url}/metrics").text
    assert re.search(r'ood_http_rejected_connections_total\{reason="connection_limit"\} [1-9]', metrics)


def test_a_client_gone_mid_body_is_logged_as_499_not_as_a_server_error(url: str) -> None:
    sock = connect(url)
    sock.sendall(
        b"POST /v1/models/digits/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 5000\r\n\r\n{"instances": ['
    )
    time.sleep(0.2)
    sock.close()
    deadline = time.monotonic() + 10
    metrics = ""
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{url}/metrics").text
        if 'status="499"' in metrics:
            break
        time.sleep(0.2)
    assert re.search(
        r'ood_http_requests_total\{method="POST",route="/v1/models/\{model\}/score",status="499"\}', metrics
    )
    assert 'status="500"' not in metrics


def test_answers_name_the_product_not_the_server_software(url: str) -> None:
    ok = httpx.post(f"{url}/v1/models/digits/score", files=[("files", ("d.png", digit_png(1)))])
    missing = httpx.get(f"{url}/v1/models/nope")
    unknown_route = httpx.get(f"{url}/nowhere")
    for response in (ok, missing, unknown_route):
        assert response.headers.get_list("server") == ["ood-serve"], response.headers


def test_keep_alive_connections_are_reused_after_a_designed_error(url: str) -> None:
    """A 4xx keeps the connection; the next pooled request on it succeeds."""
    with httpx.Client(base_url=url) as client:
        assert client.get("/v1/models/nope").status_code == 404
        assert client.get("/healthz").status_code == 200


def test_the_entry_point_and_the_tests_run_the_same_protocol(make_settings: Callable[..., Settings]) -> None:
    from service.app import create_app
    from service.server import uvicorn_config

    settings = make_settings()
    config = uvicorn_config(create_app(settings), settings)
    assert config.http.__name__ == "GuardedHttpToolsProtocol"  # type: ignore[union-attr]
    assert config.server_header is False and config.timeout_keep_alive == settings.keep_alive_s


def test_a_large_body_arriving_with_its_head_in_one_read_is_not_mistaken_for_a_long_head(url: str) -> None:
    """The head bound counts only bytes read while the head is incomplete."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400), dtype=np.uint8)).save(buffer, format="PNG")
    boundary = b"b0undary"
    body = (
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="files"; filename="n.png"\r\n\r\n'
        + buffer.getvalue()
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )
    assert len(body) > 150_000
    head = (
        b"POST /v1/models/digits/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    sock = connect(url)
    sock.sendall(head + body)  # one write: the server's first read holds the head and much of the body
    assert status_of(read_response(sock)) == 200
