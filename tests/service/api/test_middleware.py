"""Request ids of the middleware."""

from __future__ import annotations

import re

import pytest

from service.api.middleware import RequestIds


def test_generated_request_ids_are_unique_hex_and_change_prefix_in_a_forked_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = RequestIds()
    many = [ids.next() for _ in range(5000)]
    assert len(set(many)) == len(many)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in many)
    assert len({i[:16] for i in many}) == 1  # one prefix per process
    monkeypatch.setattr("service.api.middleware.os.getpid", lambda: -42)  # as seen in a forked child
    child = ids.next()
    assert child[:16] != many[0][:16] and child not in many
