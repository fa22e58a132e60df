"""Detector versions over real HTTP: the last OOD_STATE_KEEP are listed with their source, a rollback restores an
old version's scores as a new version, the same bytes again make no new version, and every write route of the
jobs and versions needs a valid key."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import AUTH, digit_png, serve
from tests.service.jobs.archives import digits_zip, wait_job

pytestmark = pytest.mark.timeout(180)
STATE = {**AUTH, "Content-Type": "application/octet-stream"}
DETECTOR = "/v1/models/digits/detectors/rb"


@pytest.fixture(scope="module")
def client(module_settings: Settings) -> Iterator[httpx.Client]:
    with serve(module_settings) as url, httpx.Client(base_url=url, timeout=60.0) as http:
        yield http


def score(client: httpx.Client, png: bytes) -> dict:
    answer = client.post("/v1/models/digits/score?detectors=rb", files=[("files", ("x.png", png))])
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["detectors"]["rb"]


def test_rollback_restores_the_old_scores_as_a_new_version(client: httpx.Client) -> None:
    mahalanobis = client.get("/v1/models/digits/detectors/mahalanobis").content
    knn = client.get("/v1/models/digits/detectors/knn").content
    assert client.put(DETECTOR, content=mahalanobis, headers=STATE).status_code == 201
    old = score(client, digit_png(4))
    assert client.put(DETECTOR, content=knn, headers=STATE).json()["version"] == 2
    assert score(client, digit_png(4))["score"] != pytest.approx(old["score"])
    restored = client.post(f"{DETECTOR}/rollback", json={"version": 1}, headers=AUTH)
    assert restored.status_code == 200, restored.text
    assert restored.json()["version"] == 3 and restored.json()["detector_class"] == "Mahalanobis"
    now = score(client, digit_png(4))
    assert now["version"] == 3 and now["score"] == pytest.approx(old["score"]) and now["is_ood"] == old["is_ood"]
    listing = client.get(f"{DETECTOR}/versions").json()
    assert listing["keep"] == 3
    assert [(v["version"], v["source"], v["rollback_of"], v["active"]) for v in listing["versions"]] == [
        (3, "rollback", 1, True),
        (2, "upload", None, False),
        (1, "upload", None, False),
    ]
    assert listing["versions"][0]["sha256"] == listing["versions"][2]["sha256"]
    assert client.get(DETECTOR).content == mahalanobis  # byte-identical to version 1
    same = client.post(f"{DETECTOR}/rollback", json={"version": 3}, headers=AUTH)
    assert same.status_code == 200 and same.json()["version"] == 3  # the active version: nothing changes


def test_only_the_last_versions_are_kept_and_others_are_404(client: httpx.Client) -> None:
    states = [client.get(f"/v1/models/digits/detectors/{n}").content for n in ("mahalanobis", "knn", "msp", "energy")]
    for state in states:
        assert client.put("/v1/models/digits/detectors/kept", content=state, headers=STATE).status_code in (200, 201)
    versions = client.get("/v1/models/digits/detectors/kept/versions").json()["versions"]
    assert [v["version"] for v in versions] == [4, 3, 2]
    gone = client.post("/v1/models/digits/detectors/kept/rollback", json={"version": 1}, headers=AUTH)
    assert gone.status_code == 404 and "kept: 2, 3, 4" in gone.json()["detail"]
    bad = client.post("/v1/models/digits/detectors/kept/rollback", json={"version": 0}, headers=AUTH)
    assert bad.status_code == 422
    assert client.get("/v1/models/digits/detectors/none/versions").status_code == 404
    assert (
        client.post("/v1/models/digits/detectors/none/rollback", json={"version": 1}, headers=AUTH).status_code == 404
    )


def test_the_same_bytes_again_make_no_new_version(client: httpx.Client) -> None:
    state = client.get("/v1/models/digits/detectors/msp").content
    first = client.put("/v1/models/digits/detectors/twice", content=state, headers=STATE)
    second = client.put("/v1/models/digits/detectors/twice", content=state, headers=STATE)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["version"] == second.json()["version"] == 1 and first.json() == second.json()
    assert len(client.get("/v1/models/digits/detectors/twice/versions").json()["versions"]) == 1


WRITES = [
    ("POST", "/v1/models/digits/detectors/auth/fit?detector_class=KNN"),
    ("POST", "/v1/models/digits/detectors/mahalanobis/rollback"),
    ("DELETE", "/v1/jobs/0123456789abcdef"),
    ("PUT", "/v1/models/digits/detectors/auth"),
    ("DELETE", "/v1/models/digits/detectors/knn"),
]


@pytest.mark.parametrize(("method", "path"), WRITES)
def test_every_write_route_needs_a_valid_key(client: httpx.Client, method: str, path: str) -> None:
    body = digits_zip() if path.endswith("KNN") else b'{"version": 1}'
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
        answer = client.request(method, path, content=body, headers={"Content-Type": "application/zip", **headers})
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
    assert client.get("/v1/jobs", params={"model": "digits", "state": "queued"}).json()["jobs"] == []
    assert "knn" in client.get("/v1/models/digits").json()["detectors"]


def test_a_fit_job_is_a_version_with_its_job_id_and_can_be_rolled_back(client: httpx.Client) -> None:
    before = client.get("/v1/models/digits/detectors/energy/versions").json()["versions"]
    job = client.post(
        "/v1/models/digits/detectors/energy/fit?detector_class=EnergyBased",
        content=digits_zip(),
        headers={**AUTH, "Content-Type": "application/zip"},
    ).json()
    assert wait_job(client, job["id"])["state"] == "done"
    versions = client.get("/v1/models/digits/detectors/energy/versions").json()["versions"]
    assert versions[0]["source"] == "fit" and versions[0]["job_id"] == job["id"]
    back = client.post(
        "/v1/models/digits/detectors/energy/rollback", json={"version": before[0]["version"]}, headers=AUTH
    )
    assert back.status_code == 200 and back.json()["sha256"] == before[0]["sha256"]
