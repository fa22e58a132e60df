"""``/openapi.json`` is the contract: every route's real answers, over HTTP, for success and for each error it
can give, are declared there (status and content type) and validate against the declared schema (jsonschema,
OpenAPI 3.1 = JSON Schema 2020-12)."""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from service.settings import Settings
from tests.service.conftest import AUTH, NoLifespanClient, digit_png, noise_png, serve
from tests.service.jobs.archives import wait_job

pytestmark = pytest.mark.timeout(180)
JSON_TYPES = ("application/json", "application/problem+json")
V2_ERROR = {"$ref": "#/components/schemas/V2Error"}


class Conformance:
    """Checks answers against the schema and records which operations were exercised."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.templates = [
            (re.compile("^" + re.sub(r"\{[^/]+\}", "[^/]+", path) + "$"), path) for path in schema["paths"]
        ]
        self.seen: set[tuple[str, str, int]] = set()

    def template(self, path: str) -> str:
        matches = [t for pattern, t in self.templates if pattern.match(path)]
        assert matches, f"{path} matches no path of the schema"
        return min(matches, key=lambda t: t.count("{"))  # /v1/models/{model}/detectors over .../{name}

    def check(self, response: httpx.Response) -> httpx.Response:
        method, path = response.request.method.lower(), response.request.url.path
        template = self.template(path)
        operation = self.schema["paths"][template].get(method)
        assert operation is not None, f"{method.upper()} {template} is not in the schema"
        status = str(response.status_code)
        declared = operation["responses"].get(status)
        assert declared is not None, f"{method.upper()} {template} answered {status}, not declared: {response.text}"
        content = {key.split(";")[0].strip(): value for key, value in (declared.get("content") or {}).items()}
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if not content:
            assert not response.content, f"{method.upper()} {template} {status} declares no body"
        else:
            assert media_type in content, f"{method.upper()} {template} {status}: {media_type} not in {list(content)}"
            body_schema = content[media_type].get("schema")
            if media_type in JSON_TYPES:
                assert body_schema, f"{method.upper()} {template} {status} declares no schema"
                resolvable = {**body_schema, "components": self.schema["components"]}
                jsonschema.Draft202012Validator(resolvable).validate(response.json())
        self.seen.add((method, template, response.status_code))
        return response


@pytest.fixture(scope="module")
def server(module_settings: Settings) -> Iterator[str]:
    settings = module_settings.model_copy(update={"max_images_per_request": 3})
    with serve(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60.0) as http:
        yield http


@pytest.fixture(scope="module")
def conformance(client: httpx.Client) -> Conformance:
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.1")
    return Conformance(schema)


def _files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]


def test_every_route_answers_what_its_schema_declares(client: httpx.Client, conformance: Conformance) -> None:
    check: Callable[[httpx.Response], httpx.Response] = conformance.check
    get, post, put, delete = client.get, client.post, client.put, client.delete
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v1/models/digits", "/v1/models/digits-seg"):
        assert check(get(path)).status_code == 200
    assert check(get("/v1/models/nope")).status_code == 404
    assert check(get("/v1/models/bad%20name")).status_code == 422
    assert check(get("/v1/models/digits/detectors")).status_code == 200
    assert check(get("/v1/models/nope/detectors")).status_code == 404

    state = check(get("/v1/models/digits/detectors/mahalanobis"))
    assert state.status_code == 200 and state.content[:8]  # safetensors header length
    assert check(get("/v1/models/digits/detectors/none")).status_code == 404
    url = "/v1/models/digits/detectors/copy"
    assert check(put(url, content=state.content, headers=AUTH)).status_code == 201
    assert check(put(url, content=state.content, headers=AUTH)).status_code == 200
    assert check(put(url, content=state.content)).status_code == 401
    assert check(put(url, content=state.content, headers={"Authorization": "Bearer wrong"})).status_code == 403
    assert check(put(url, content=b"not a state", headers=AUTH)).status_code == 422
    assert check(put(url, content=b"{}", headers={**AUTH, "Content-Type": "application/json"})).status_code == 415
    assert check(put(url, files={"other": ("x", b"x")}, headers=AUTH)).status_code == 400
    assert check(delete(url, headers=AUTH)).status_code == 204
    assert check(delete(url, headers=AUTH)).status_code == 404
    assert check(delete(url)).status_code == 401

    score = "/v1/models/digits/score"
    answer = check(post(score, files=_files(digit_png(1), noise_png(2))))
    assert answer.status_code == 200 and len(answer.json()["results"]) == 2
    b64 = base64.b64encode(digit_png(3)).decode()
    assert check(post(score + "?tpr=0.9&detectors=knn,msp", json={"instances": [{"b64": b64}]})).status_code == 200
    assert check(post(score + "?threshold=nan", files=_files(digit_png(1)))).status_code == 400
    both = check(post(score + "?threshold=1.5&tpr=0.9&detectors=knn", files=_files(digit_png(1))))
    assert both.json()["results"][0]["detectors"]["knn"]["threshold"] == 1.5  # the absolute threshold wins
    assert check(post(score, json={"instances": []})).status_code == 400
    assert check(post(score + "?tpr=2", files=_files(digit_png(1)))).status_code == 422
    assert check(post(score, files=_files(b"not an image"))).status_code == 422
    assert check(post(score + "?detectors=none", files=_files(digit_png(1)))).status_code == 404
    assert check(post(score, content=b"x", headers={"Content-Type": "text/plain"})).status_code == 415
    assert check(post(score, files=_files(*(digit_png(i) for i in range(4))))).status_code == 413
    assert check(post("/v1/models/digits-seg/score", files=_files(digit_png(1)))).status_code == 404

    segment = "/v1/models/digits-seg/segment"
    for fmt in ("png", "npy", "json"):
        answer = check(post(f"{segment}?format={fmt}", files=_files(noise_png(4, 64), digit_png(5))))
        assert answer.status_code == 200
        assert {d["map"]["format"] for r in answer.json()["results"] for d in r["detectors"].values()} == {fmt}
    assert check(post(segment + "?format=gif", files=_files(digit_png(1)))).status_code == 422
    assert check(post("/v1/models/digits/segment", files=_files(digit_png(1)))).status_code == 404

    fit = "/v1/models/digits/detectors/fitted/fit"
    images = [digit_png(i % 6) for i in range(12)]
    form = {"labels": ",".join(str(i % 6) for i in range(12)), "detector_class": "EnergyBased"}
    started = check(post(fit, files=_files(*images), data=form, headers=AUTH))
    assert started.status_code == 202
    assert check(post(fit, files=_files(*images), data={**form, "labels": "1"}, headers=AUTH)).status_code == 400
    assert check(post(fit, files=_files(*images), data=form)).status_code == 401
    assert check(post(fit, content=b"x", headers={**AUTH, "Content-Type": "text/plain"})).status_code == 415
    odin = {**form, "detector_class": "ODIN"}
    assert check(post(fit, files=_files(*images), data=odin, headers=AUTH)).status_code == 422
    job = f"/v1/jobs/{started.json()['id']}"
    wait_job(client, started.json()["id"])
    assert check(get(job)).json()["state"] == "done"
    assert check(get(job + "/events")).status_code == 200
    assert check(get("/v1/jobs?model=digits&state=done")).status_code == 200
    assert check(get("/v1/jobs?state=nope")).status_code == 422
    assert check(get("/v1/jobs/0123456789abcdef")).status_code == 404
    assert check(get("/v1/jobs/0123456789abcdef/events")).status_code == 404
    assert check(delete(job, headers=AUTH)).status_code == 409
    assert check(delete(job)).status_code == 401
    assert check(delete("/v1/jobs/0123456789abcdef", headers=AUTH)).status_code == 404
    slow = [digit_png(i % 6) for i in range(3)] * 200
    slow_form = {**form, "labels": ",".join("0" * 600)}
    running = check(post(fit + "?batch_size=1", files=_files(*slow), data=slow_form, headers=AUTH))
    assert check(delete(f"/v1/jobs/{running.json()['id']}", headers=AUTH)).status_code == 200
    versions = check(get("/v1/models/digits/detectors/fitted/versions"))
    assert versions.status_code == 200 and versions.json()["versions"][0]["source"] == "fit"
    assert check(get("/v1/models/digits/detectors/none/versions")).status_code == 404
    rollback = "/v1/models/digits/detectors/fitted/rollback"
    assert check(post(rollback, json={"version": 1}, headers=AUTH)).status_code == 200
    assert check(post(rollback, json={"version": 99}, headers=AUTH)).status_code == 404
    assert check(post(rollback, json={"version": "x"}, headers=AUTH)).status_code == 422
    assert check(post(rollback, json={"version": 1})).status_code == 401

    assert check(get("/v1/models/digits/drift")).status_code == 200  # drift (tests/service/api/test_drift.py)
    assert check(get("/v1/models/nope/drift")).status_code == 404

    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/digits", "/v2/models/digits-seg"):
        assert check(get(path)).status_code == 200  # the Open Inference Protocol (tests/service/api/v2/)
    for path in ("/v2/models/digits/ready", "/v2/models/digits/versions/1", "/v2/models/digits/versions/1/ready"):
        assert check(get(path)).status_code == 200
    assert check(get("/v2/models/nope")).status_code == 404
    assert check(get("/v2/models/digits/versions/2/ready")).status_code == 404
    assert check(get("/v2/models/bad%20name/ready")).status_code == 400
    images = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64]}
    for infer in ("/v2/models/digits/infer", "/v2/models/digits/versions/1/infer", "/v2/models/digits-seg/infer"):
        assert check(post(infer, json={"inputs": [images], "parameters": {"tpr": 0.9}})).status_code == 200
    header = json.dumps({"inputs": [{**images, "data": None, "parameters": {"binary_data_size": 4 + 4}}]}).encode()
    binary = {"Inference-Header-Content-Length": str(len(header))}
    answer = check(post("/v2/models/digits/infer", content=header + struct.pack("<I", 4) + b"abcd", headers=binary))
    assert answer.status_code == 400 and "images[0]" in answer.json()["error"]
    binary_output = {"inputs": [images], "parameters": {"binary_data_output": True}}
    assert (
        check(post("/v2/models/digits/infer", json=binary_output)).headers["content-type"] == "application/octet-stream"
    )
    assert check(post("/v2/models/digits/infer", json={"inputs": [{**images, "shape": [4]}] * 4})).status_code == 400
    assert check(post("/v2/models/digits/versions/3/infer", json={"inputs": [images]})).status_code == 404
    assert (
        check(
            post("/v2/models/digits/infer", json={"inputs": [{**images, "shape": [4], "data": [b64] * 4}]})
        ).status_code
        == 413
    )

    operations = {(m, p) for p, ops in conformance.schema["paths"].items() for m in ops}
    assert operations == {(m, p) for m, p, _ in conformance.seen}, "every route of the schema is exercised"


def test_every_operation_declares_problem_bodies_and_writes_declare_the_bearer_scheme(
    conformance: Conformance,
) -> None:
    schema = conformance.schema
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key of OOD_API_KEYS / OOD_API_KEYS_FILE",
    }
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert any(s.startswith("2") for s in responses), f"{method} {path} declares no success"
            for status, declared in responses.items():
                if status.startswith(("4", "5")) and path.startswith("/v2"):  # the protocol's {"error": ...}
                    assert declared["content"] == {"application/json": {"schema": V2_ERROR}}, (method, path, status)
                elif status.startswith(("4", "5")):
                    assert list(declared["content"]) == ["application/problem+json"], (method, path, status)
            assert "500" in responses
            writes = method in ("put", "delete") or path.endswith(("/fit", "/rollback"))
            assert (operation.get("security") == [{"HTTPBearer": []}]) == writes, (method, path)
            assert not writes or {"401", "403"} <= set(responses), (method, path)


def test_a_warming_up_service_answers_503_as_declared(make_settings: Callable[..., Settings]) -> None:
    """Before start-up ends, readiness and lookups are 503 problem bodies (no lifespan: never ready)."""

    from service.app import create_app

    app = create_app(make_settings())
    client = NoLifespanClient(app)
    conformance = Conformance(client.get("/openapi.json").json())
    for path in ("/readyz", "/v1/models", "/v1/models/digits", "/v1/models/digits/detectors"):
        assert conformance.check(client.get(path)).status_code == 503
    assert conformance.check(client.post("/v1/models/digits/score", files=_files(digit_png(1)))).status_code == 503
    assert conformance.check(client.get("/healthz")).status_code == 200


def test_an_unexpected_error_is_a_declared_500(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api.routes import models

    def broken(model: object) -> object:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(models, "model_info", broken)
    with serve(make_settings()) as url, httpx.Client(base_url=url) as http:
        conformance = Conformance(http.get("/openapi.json").json())
        answer = conformance.check(http.get("/v1/models/digits"))
    assert answer.status_code == 500 and "secret" not in answer.text
