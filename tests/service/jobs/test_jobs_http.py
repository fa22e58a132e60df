"""Fit jobs over real HTTP (uvicorn on loopback): a zip of the digits reaches ``done`` with its evaluation and the
new state scores; progress streams as Server-Sent Events; a cancel leaves the previous state; malformed archives
fail their job with the reason and write nothing; a second job on a model waits for the first; the queue bound
answers 429."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import AUTH, digit_png, noise_png, serve
from tests.service.jobs.archives import digit_members, digits_zip, tar_of, wait_job, zip_of

pytestmark = pytest.mark.timeout(300)
ZIP = {**AUTH, "Content-Type": "application/zip"}
TAR = {**AUTH, "Content-Type": "application/x-tar"}
FIT = "/v1/models/digits/detectors/{name}/fit?detector_class={cls}&batch_size={batch}"


@pytest.fixture(scope="module")
def client(module_settings: Settings) -> Iterator[httpx.Client]:
    with serve(module_settings) as url, httpx.Client(base_url=url, timeout=60.0) as http:
        yield http


def start(client: httpx.Client, name: str, data: bytes, cls: str = "Mahalanobis", batch: int = 16, **kw: str) -> dict:
    extra = "".join(f"&{k}={v}" for k, v in kw.items())
    response = client.post(FIT.format(name=name, cls=cls, batch=batch) + extra, content=data, headers=ZIP)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    return response.json()


def score(client: httpx.Client, name: str, png: bytes) -> dict:
    answer = client.post(f"/v1/models/digits/score?detectors={name}", files=[("files", ("x.png", png))])
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["detectors"][name]


def slow_zip() -> bytes:
    """2400 digits (no OOD): at batch_size=1 a job over it runs for seconds on a small CPU."""
    return digits_zip(per_class=100, ood=0, repeat=4)


def test_a_zip_of_digits_reaches_done_with_its_evaluation_and_the_new_state_scores(client: httpx.Client) -> None:
    job = start(client, "zip-fit", digits_zip())
    assert job["state"] in ("queued", "running") and job["model"] == "digits" and job["detector"] == "zip-fit"
    done = wait_job(client, job["id"])
    assert done["state"] == "done", done
    result = done["result"]
    assert result["metrics"]["AUROC"] > 0.95 and set(result["metrics"]) == {"AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR"}
    assert result["calibration_size"] == 12  # 10% of each class's 20 ID images, stratified
    assert done["images_done"] == done["images_total"] == 140 and done["finished_at"] >= done["started_at"]
    assert any("too small" in w for w in result["warnings"])  # 12 < 1 / (1 - 0.95)
    info = client.get("/v1/models/digits/detectors").json()["detectors"]
    (fitted,) = [d for d in info if d["name"] == "zip-fit"]
    assert (fitted["version"], fitted["sha256"]) == (result["version"], result["sha256"])
    assert fitted["calibration_size"] == 12 and any("too small" in w for w in fitted["warnings"])
    digit, noise = score(client, "zip-fit", digit_png(0)), score(client, "zip-fit", noise_png(3))
    assert digit["version"] == result["version"] and digit["threshold"] == pytest.approx(result["threshold"])
    assert digit["score"] < noise["score"] and noise["is_ood"] is True
    (version,) = client.get("/v1/models/digits/detectors/zip-fit/versions").json()["versions"]
    assert version["source"] == "fit" and version["job_id"] == job["id"] and version["active"] is True
    listed = client.get("/v1/jobs", params={"model": "digits", "state": "done"}).json()["jobs"]
    assert job["id"] in [j["id"] for j in listed] and all(j["state"] == "done" for j in listed)
    assert client.get("/v1/jobs", params={"model": "digits-seg"}).json()["jobs"] == []


def events_of(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    found: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                found.append((kind, json.loads(line[len("data: ") :])))
    return found


def test_progress_streams_as_server_sent_events_then_the_final_job(client: httpx.Client) -> None:
    job = start(client, "sse-fit", digits_zip(), batch=8)
    events = events_of(client, job["id"])
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "job" and kinds.count("job") == 1 and events[-1][1]["state"] == "done"
    done = [data["images_done"] for kind, data in events if kind == "progress" and data["images_done"] > 0]
    assert len(done) >= 3 and done == sorted(done) and done[0] < done[-1] <= 140
    replay = events_of(client, job["id"])  # the stream of an ended job: its history, then the end
    assert replay[-1] == events[-1]
    resumed = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(len(events) - 1)}).text
    assert resumed.count("event: ") == 1 and "event: job" in resumed


def test_a_cancelled_job_leaves_the_previous_state_and_a_second_job_waits(client: httpx.Client) -> None:
    before = client.get("/v1/models/digits/detectors/mahalanobis/versions").json()["versions"]
    first = start(client, "mahalanobis", slow_zip(), batch=1)
    second = start(client, "mahalanobis", digits_zip())
    third = start(client, "mahalanobis", digits_zip())
    assert wait_job(client, first["id"], until=("running",))["state"] == "running"
    assert client.get(f"/v1/jobs/{second['id']}").json()["state"] == "queued"  # one running job per model
    cancelled = client.delete(f"/v1/jobs/{third['id']}", headers=AUTH)  # a queued one
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    cancelled = client.delete(f"/v1/jobs/{first['id']}", headers=AUTH)  # the running one
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    assert cancelled.json()["result"] is None and cancelled.json()["images_done"] < 2400
    assert client.get("/v1/models/digits/detectors/mahalanobis/versions").json()["versions"] == before
    again = client.delete(f"/v1/jobs/{first['id']}", headers=AUTH)
    assert again.status_code == 409 and again.headers["content-type"].startswith("application/problem+json")
    assert wait_job(client, second["id"])["state"] == "done"  # it ran once the first ended
    assert (
        client.get("/v1/models/digits/detectors/mahalanobis/versions").json()["versions"][0]["job_id"] == second["id"]
    )
    assert client.delete("/v1/jobs/0123456789abcdef", headers=AUTH).status_code == 404


MEMBERS = list(digit_members())
MALFORMED: dict[str, tuple[bytes, dict[str, str], str]] = {
    "unknown class folder": (zip_of([*MEMBERS, ("7/x.png", MEMBERS[0][1])]), ZIP, "unknown class folder '7'"),
    "corrupt image": (zip_of([*MEMBERS, ("0/broken.png", b"\x89PNG\r\n\x1a\nnot really")]), ZIP, "0/broken.png"),
    "huge compression ratio": (zip_of([*MEMBERS, ("0/bomb.png", bytes(8 << 20))]), ZIP, "compression ratio"),
    "path traversal": (zip_of([*MEMBERS, ("../0/x.png", MEMBERS[0][1])]), ZIP, "path-traversal"),
    "tar link": (tar_of(MEMBERS, links={"0/link.png": "/etc/passwd"}), TAR, "links are refused"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_archive_fails_its_job_with_the_reason_and_writes_nothing(
    client: httpx.Client, module_settings: Settings, case: str
) -> None:
    data, headers, reason = MALFORMED[case]
    response = client.post(FIT.format(name="bad-fit", cls="Mahalanobis", batch=16), content=data, headers=headers)
    assert response.status_code == 202, response.text
    failed = wait_job(client, response.json()["id"])
    assert failed["state"] == "failed" and reason in failed["error"], failed
    assert str(module_settings.state_dir) not in failed["error"] and "spool" not in failed["error"]
    assert "--" not in failed["error"]  # job parameters, not ood-fit's options
    assert "bad-fit" not in client.get("/v1/models/digits").json()["detectors"]
    assert not (module_settings.state_dir / "digits" / "bad-fit").exists()
    assert list((module_settings.state_dir / ".jobs" / "spool").iterdir()) == []
    assert list((module_settings.state_dir / ".uploads").iterdir()) == []


def test_parameters_and_bodies_are_checked_before_a_job_exists(client: httpx.Client) -> None:
    base = "/v1/models/digits/detectors/p/fit"
    unknown = client.post(f"{base}?detector_class=NoSuch", content=digits_zip(), headers=ZIP)
    assert unknown.status_code == 400 and "Mahalanobis" in unknown.json()["detail"]  # the known ones are listed
    odin = client.post(f"{base}?detector_class=ODIN", content=digits_zip(), headers=ZIP)
    assert odin.status_code == 422
    for query in ("tpr=1.5", "calibration_share=0", "hparams=%7Bnot", "seed=-1"):
        bad = client.post(f"{base}?detector_class=KNN&{query}", content=digits_zip(), headers=ZIP)
        assert bad.status_code == 400, (query, bad.text)
    assert client.post(base, content=digits_zip(), headers=ZIP).status_code == 400  # no detector_class
    text = client.post(f"{base}?detector_class=KNN", content=b"x", headers={**AUTH, "Content-Type": "text/plain"})
    assert text.status_code == 415
    empty = client.post(f"{base}?detector_class=KNN", content=b"", headers=ZIP)
    assert empty.status_code == 400
    no_root = client.post(base, json={"detector_class": "KNN", "source": "digits"}, headers=AUTH)
    assert no_root.status_code == 400 and "OOD_FIT_DATA_ROOT" in no_root.json()["detail"]
    assert client.post(f"{base}?detector_class=KNN", content=digits_zip()).status_code == 401
    assert client.get("/v1/jobs", params={"state": "nope"}).status_code == 422


@pytest.fixture(scope="module")
def one_slot_server(make_settings_module: Callable[..., Settings]) -> Iterator[httpx.Client]:
    settings = make_settings_module(max_queued_fit_jobs=1, max_fit_upload_mb=4)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60.0) as http:
        http.state_dir = settings.state_dir  # type: ignore[attr-defined]
        yield http


def test_the_queue_of_a_model_is_bounded(one_slot_server: httpx.Client) -> None:
    client = one_slot_server
    running = start(client, "bounded", slow_zip(), batch=1)
    queued = start(client, "bounded", digits_zip())
    refused = client.post(FIT.format(name="bounded", cls="KNN", batch=16), content=digits_zip(), headers=ZIP)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    other_model = client.post(
        "/v1/models/digits-seg/detectors/m/fit?detector_class=MaxLogit", content=digits_zip(), headers=ZIP
    )
    assert other_model.status_code == 202  # the bound is per model
    for job in (running, queued):
        client.delete(f"/v1/jobs/{job['id']}", headers=AUTH)
    wait_job(client, other_model.json()["id"])


@pytest.fixture(scope="module")
def make_settings_module(demo_state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Settings]:
    import shutil

    from service.settings import load_settings
    from tests.service.conftest import API_KEY

    def make(**overrides: Any) -> Settings:
        states = tmp_path_factory.mktemp("states")
        shutil.copytree(demo_state_dir, states, dirs_exist_ok=True)
        return load_settings(state_dir=states, api_keys=API_KEY, **overrides)

    return make


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(one_slot_server: httpx.Client) -> None:
    client = one_slot_server
    url = FIT.format(name="big", cls="KNN", batch=16)
    big = bytes(5 << 20)
    announced = client.post(url, content=big, headers=ZIP)
    assert announced.status_code == 413, announced.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds on the bytes received
        for _ in range(5):
            yield bytes(1 << 20)

    streamed = client.post(url, content=chunks(), headers=ZIP)
    assert streamed.status_code == 413, streamed.text
    state_dir: Path = client.state_dir  # type: ignore[attr-defined]
    assert list((state_dir / ".jobs" / "spool").iterdir()) == []
    assert [j for j in client.get("/v1/jobs").json()["jobs"] if j["detector"] == "big"] == []
