"""The V2 tests' server (the demo, at most 8 images a request), Triton's client of it and an ``httpx`` client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import tritonclient.http as triton

from service.settings import Settings
from tests.service.conftest import serve


@pytest.fixture(scope="module")
def server(module_settings: Settings) -> Iterator[str]:
    with serve(module_settings.model_copy(update={"max_images_per_request": 8})) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=server.removeprefix("http://"), network_timeout=60.0) as v2:
        yield v2


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60.0) as session:
        yield session
