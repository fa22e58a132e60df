"""The multipart parser against bodies a real client (httpx) encodes, and malformed ones."""

from __future__ import annotations

import httpx
import pytest

from service.api.multipart import parse_multipart
from service.errors import BadRequestError


def test_multipart_parser_reads_files_and_fields_like_httpx_encodes_them() -> None:
    request = httpx.Request(
        "POST",
        "http://x/",
        files=[("files", ("a.png", b"\r\n--not-the-boundary\r\n\x00bin")), ("files", ("b.png", b""))],
        data={"labels": "1,2", "detector_class": "KNN"},
    )
    body = request.read()
    parts = parse_multipart(body, request.headers["content-type"])
    assert [(p.name, p.filename, p.data) for p in parts if p.is_file] == [
        ("files", "a.png", b"\r\n--not-the-boundary\r\n\x00bin"),
        ("files", "b.png", b""),
    ]
    assert {p.name: p.data for p in parts if not p.is_file} == {"labels": b"1,2", "detector_class": b"KNN"}


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx', 'multipart/form-data; boundary="b"', "truncated"),
        (
            b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--",
            "multipart/form-data; boundary=b",
            "Content-Disposition",
        ),
        (b"no parts", "multipart/form-data; boundary=b", "no part"),
        (b"", "multipart/form-data", "boundary"),
    ],
)
def test_multipart_parser_rejects_malformed_bodies(body: bytes, content_type: str, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        parse_multipart(body, content_type)
