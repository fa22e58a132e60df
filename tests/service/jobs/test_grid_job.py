"""Grid-search fit jobs over real HTTP (uvicorn on loopback): a KNN grid on the digits zip reaches ``done``, reports
every candidate, installs the best (first of the highest AUROC), and its result equals a single fit's with the
winning hyperparameters; a bad candidate is an error row; a grid without ``ood/`` fails the job with the reason
and installs nothing; a malformed grid is a 400 before any job."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from safetensors.torch import load as load_tensors

from ood_core.state import read_state_info
from service.settings import Settings
from tests.service.conftest import AUTH, serve
from tests.service.jobs.archives import digits_zip, wait_job

pytestmark = pytest.mark.timeout(300)
ZIP = {**AUTH, "Content-Type": "application/zip"}


@pytest.fixture(scope="module")
def client(module_settings: Settings) -> Iterator[httpx.Client]:
    with serve(module_settings) as url, httpx.Client(base_url=url, timeout=60.0) as http:
        yield http


def post_fit(client: httpx.Client, name: str, hparams: dict, data: bytes) -> httpx.Response:
    params = {"detector_class": "KNN", "batch_size": "16", "hparams": json.dumps(hparams)}
    return client.post(f"/v1/models/digits/detectors/{name}/fit", params=params, content=data, headers=ZIP)


def run_job(client: httpx.Client, name: str, hparams: dict, data: bytes) -> dict:
    response = post_fit(client, name, hparams, data)
    assert response.status_code == 202, response.text
    return wait_job(client, response.json()["id"])


def test_a_grid_job_reports_every_candidate_installs_the_best_and_equals_its_single_fit(client: httpx.Client) -> None:
    data = digits_zip()
    job = run_job(client, "grid-knn", {"grid": {"k": [1, 5]}}, data)
    assert job["state"] == "done", job
    assert job["parameters"]["hparams"] == {"grid": {"k": [1, 5]}}
    result, search = job["result"], job["result"]["search"]
    assert search["detector"] == "KNN" and search["metric"] == "AUROC" and search["higher_is_better"] is True
    rows = search["results"]
    assert [row["params"] for row in rows] == [{"k": 1}, {"k": 5}]
    assert all(
        row["error"] is None and set(row["metrics"]) == {"AUROC", "AUPR-IN", "AUPR-OUT", "FPR95TPR"} for row in rows
    )
    scores = [row["score"] for row in rows]
    best = rows[scores.index(max(scores))]  # the first of the highest
    assert search["best"] == {"params": best["params"], "hparams": best["hparams"], "score": best["score"]}
    assert result["hparams"] == best["hparams"] and result["metrics"] == best["metrics"]
    installed = client.get("/v1/models/digits/detectors/grid-knn")
    assert installed.status_code == 200 and installed.headers["etag"] == f'"{result["sha256"]}"'
    assert read_state_info(installed.content).hparams["k"] == best["params"]["k"]

    single = run_job(client, "single-knn", best["hparams"], data)
    assert single["state"] == "done", single
    assert single["result"]["metrics"]["AUROC"] == result["metrics"]["AUROC"]
    assert single["result"]["metrics"] == result["metrics"] and single["result"]["search"] is None
    assert single["result"]["threshold"] == pytest.approx(result["threshold"])
    same = client.get("/v1/models/digits/detectors/single-knn").content  # the same state (safetensors' metadata
    assert read_state_info(same).hparams == read_state_info(installed.content).hparams  # order varies between saves)
    want, got = load_tensors(same), load_tensors(installed.content)
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert single["result"]["calibration_size"] == result["calibration_size"] == 12


def test_a_bad_candidate_of_a_grid_job_is_an_error_row(client: httpx.Client) -> None:
    job = run_job(client, "grid-bad-k", {"grid": {"k": [0, 3]}}, digits_zip())
    assert job["state"] == "done", job
    bad, good = job["result"]["search"]["results"]
    assert bad["params"] == {"k": 0} and "k must be an integer >= 1" in bad["error"] and bad["score"] is None
    assert good["error"] is None and job["result"]["hparams"] == {"k": 3}


def test_a_grid_job_without_ood_fails_with_the_reason_and_installs_nothing(client: httpx.Client) -> None:
    job = run_job(client, "grid-no-ood", {"grid": {"k": [1, 5]}}, digits_zip(ood=0))
    assert job["state"] == "failed" and job["result"] is None
    assert "no ood/ folder" in job["error"]
    assert client.get("/v1/models/digits/detectors/grid-no-ood").status_code == 404


@pytest.mark.parametrize(
    ("hparams", "detail"),
    [
        ({"grid": {"k": 5}}, "hparams.grid.k must be a non-empty list"),
        ({"grid": {"k": [0, -1]}}, "no candidate of hparams.grid can be built"),
        ({"k": 1, "grid": {"k": [1]}}, "both fixed and in the grid"),
    ],
)
def test_a_malformed_grid_is_a_400_and_no_job(client: httpx.Client, hparams: dict, detail: str) -> None:
    before = len(client.get("/v1/jobs").json()["jobs"])
    response = post_fit(client, "grid-refused", hparams, digits_zip())
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/problem+json")
    assert detail in response.json()["detail"]
    assert len(client.get("/v1/jobs").json()["jobs"]) == before
