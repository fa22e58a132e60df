"""A generated hostile corpus over real HTTP (uvicorn on 127.0.0.1, the demo): every case answers a 200 with the
documented handling (``service/engine/decode.py``) or a 4xx ``application/problem+json`` whose ``detail`` says
why; never a 5xx; ``/healthz`` still answers after each case. The corpus and the checks: ``hostile.py``; the memory
of a real server process under the amplification case: ``test_hostile_memory.py``.

Every byte is built here.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from service.demo import DEFAULT_DETECTOR
from tests.service.api.hostile import CASES, SCORE, SEGMENT, Case, check_maps_bounded, check_problem
from tests.service.conftest import digit_png, png_bytes

pytestmark = pytest.mark.timeout(120)


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
