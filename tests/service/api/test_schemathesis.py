"""Schemathesis against the live ``/openapi.json`` of a real server (uvicorn over HTTP, ``serve(...)``).

Every operation of the schema is fuzzed with ALL of schemathesis' checks (the defaults of
``case.call_and_validate()``: ``not_a_server_error``, ``status_code_conformance``, ``content_type_conformance``,
``response_schema_conformance``, ``response_headers_conformance``, ``positive_data_acceptance``,
``negative_data_rejection``, ``missing_required_header``, ``unsupported_method``, ``allow_header_conformance``,
``ignored_auth``, ... ; none is excluded; two accept 413 as the designed refusal where the schema cannot state
the limit, see :data:`CONFIG_TOML`), once without a key and once with
``Authorization: Bearer <API_KEY>`` (so that the write routes get past auth). Failures are asserted strictly.

Destructive operations: the write operations (``PUT`` / ``DELETE`` of a detector state, ``POST .../fit`` and
``.../rollback``, ``DELETE /v1/jobs/{id}``) never reach the server of the read operations (``reads_url``; it serves
everything else, the state download ``GET .../detectors/{name}`` included). They run against servers of their own,
each with its own copy of the demo states: ``writes_url`` and ``job_writes_url`` (cancel and rollback) without a
key (the failed-auth limiter as configured: its 429s are checked too) and
``writes_key_url`` with the key (its limiter raised: ``ignored_auth`` probes every success without a key and with
a wrong one, and the no-key run alone passes 30 failures a minute, so one shared limiter would answer the key run
with 429 only). A fuzzed upload, delete or fit may replace or remove any demo detector there without changing what
the read operations see.

Generation is steered towards the real API so that the success paths are reached, not only the 404/422 of random
names (``fuzz_steering.py``, shared with ``bench/fuzz.sh``: the schemathesis dictionaries of :data:`CONFIG_TOML`
and the :func:`map_case` hook, which puts real images, state files and fit requests in the bodies of positive
cases).

CI size: ``max_examples=15`` per operation and test in the fuzzing phase, plus schemathesis' examples and coverage
phases (the pytest integration runs no stateful phase; ``bench/fuzz.sh`` does, for the reads), Hypothesis
derandomized (``derandomize=True``, no example database) so a run is reproducible, ``deadline=None`` and the
``too_slow`` health check suppressed (a shared 2-core machine). 15 s while operations fail early (Hypothesis stops an
operation at its first failure and shrinks it); budgeted at under 90 s once they all pass.

Compatibility note: ``schemathesis.pytest.from_fixture`` (4.32.5) reads ``request.node._nodeid``, which pytest 9.2
renamed (``Node._id``); the function-scoped schema fixtures below set that attribute first (:func:`_nodeid_shim`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.specs.openapi.schemas import OpenApiSchema

from service.settings import Settings, load_settings
from tests.service.api.fuzz_steering import (
    CONFIG_TOML,
    REQUEST_TIMEOUT_S,
    is_job_write,
    is_write,
    load_states,
    map_case,
)
from tests.service.conftest import API_KEY, AUTH, serve

pytestmark = pytest.mark.timeout(300)

MAX_EXAMPLES = 15
HYPOTHESIS_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def reads_url(module_settings: Settings) -> Iterator[str]:
    """The server of the read operations: no write ever reaches it."""
    with serve(module_settings) as url:
        load_states(url)
        yield url


def _copy_states(demo_state_dir: Path, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    states = tmp_path_factory.mktemp(name)
    shutil.copytree(demo_state_dir, states, dirs_exist_ok=True)
    return states


@pytest.fixture(scope="module")
def writes_url(demo_state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server of the write operations without a key, with its own copy of the demo states (and the failed-auth
    limiter as configured by default: its 429s are part of what is checked)."""
    states = _copy_states(demo_state_dir, tmp_path_factory, "write-states")
    with serve(load_settings(state_dir=states, api_keys=API_KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def job_writes_url(demo_state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server of the job and version writes without a key (like :func:`writes_url`)."""
    states = _copy_states(demo_state_dir, tmp_path_factory, "job-write-states")
    with serve(load_settings(state_dir=states, api_keys=API_KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def writes_key_url(demo_state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server of the write operations with the key: its own states, and the failed-auth limiter raised, since
    ``ignored_auth`` probes every success without a key and with a wrong one, which would lock 127.0.0.1 out."""
    states = _copy_states(demo_state_dir, tmp_path_factory, "write-key-states")
    overrides: dict[str, Any] = {"state_dir": states, "api_keys": API_KEY}
    if "auth_failures_per_minute" in Settings.model_fields:
        overrides["auth_failures_per_minute"] = 1_000_000
    with serve(load_settings(**overrides)) as url:
        yield url


def load_schema(url: str) -> OpenApiSchema:
    """The server's live schema with :data:`CONFIG_TOML` and the :func:`map_case` hook."""
    schema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", config=schemathesis.Config.from_str(CONFIG_TOML), timeout=REQUEST_TIMEOUT_S
    )
    schema.config.update(base_url=url)
    schema.hook(map_case)
    return schema


def _nodeid_shim(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32.5's lazy schemas read and restore ``node._nodeid`` (pytest < 9.2's attribute)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.fixture(scope="module")
def _reads_schema(reads_url: str) -> OpenApiSchema:
    return load_schema(reads_url)


@pytest.fixture(scope="module")
def _writes_schema(writes_url: str) -> OpenApiSchema:
    return load_schema(writes_url)


@pytest.fixture(scope="module")
def _job_writes_schema(job_writes_url: str) -> OpenApiSchema:
    return load_schema(job_writes_url)


@pytest.fixture(scope="module")
def _writes_key_schema(writes_key_url: str) -> OpenApiSchema:
    return load_schema(writes_key_url)


@pytest.fixture
def reads_schema(request: pytest.FixtureRequest, _reads_schema: OpenApiSchema) -> OpenApiSchema:
    _nodeid_shim(request)
    return _reads_schema


@pytest.fixture
def writes_schema(request: pytest.FixtureRequest, _writes_schema: OpenApiSchema) -> OpenApiSchema:
    _nodeid_shim(request)
    return _writes_schema


@pytest.fixture
def job_writes_schema(request: pytest.FixtureRequest, _job_writes_schema: OpenApiSchema) -> OpenApiSchema:
    _nodeid_shim(request)
    return _job_writes_schema


@pytest.fixture
def writes_key_schema(request: pytest.FixtureRequest, _writes_key_schema: OpenApiSchema) -> OpenApiSchema:
    _nodeid_shim(request)
    return _writes_key_schema


reads = schemathesis.pytest.from_fixture("reads_schema").exclude(is_write)
writes = schemathesis.pytest.from_fixture("writes_schema").include(is_write).exclude(is_job_write)
job_writes = schemathesis.pytest.from_fixture("job_writes_schema").include(is_job_write)
writes_with_key = schemathesis.pytest.from_fixture("writes_key_schema").include(is_write)


# ---------------------------------------------------------------------------------------------- tests
@reads.parametrize()
@HYPOTHESIS_SETTINGS
def test_reads_without_key(case: Case) -> None:
    case.call_and_validate(timeout=REQUEST_TIMEOUT_S)


@reads.parametrize()
@HYPOTHESIS_SETTINGS
def test_reads_with_key(case: Case) -> None:
    case.call_and_validate(headers=AUTH, timeout=REQUEST_TIMEOUT_S)


@writes.parametrize()
@HYPOTHESIS_SETTINGS
def test_writes_without_key(case: Case) -> None:
    case.call_and_validate(timeout=REQUEST_TIMEOUT_S)


@job_writes.parametrize()
@HYPOTHESIS_SETTINGS
def test_job_writes_without_key(case: Case) -> None:
    case.call_and_validate(timeout=REQUEST_TIMEOUT_S)


@writes_with_key.parametrize()
@HYPOTHESIS_SETTINGS
def test_writes_with_key(case: Case) -> None:
    case.call_and_validate(headers=AUTH, timeout=REQUEST_TIMEOUT_S)
