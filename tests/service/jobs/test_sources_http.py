"""The other ways to give a fit job its data, over real HTTP: a path under OOD_FIT_DATA_ROOT (nothing outside it
reachable, links included), a multipart ``file`` (a .tar.gz), a safetensors of precomputed outputs."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from service.settings import Settings
from tests.service.conftest import AUTH, digit_png, noise_png, serve
from tests.service.jobs.archives import digit_members, tar_of, wait_job, write_folder

pytestmark = pytest.mark.timeout(180)
FIT = "/v1/models/digits/detectors/{name}/fit"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fit-data")
    write_folder(root / "digits", digit_members())
    (root / "archives").mkdir()
    (root / "archives" / "digits.tar").write_bytes(tar_of(list(digit_members())))
    outside = tmp_path_factory.mktemp("outside")
    write_folder(outside / "more", digit_members(per_class=2, ood=0))
    write_folder(root / "linked", digit_members())
    (root / "linked" / "0" / "escape").symlink_to(outside / "more" / "0", target_is_directory=True)
    (root / "away").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def client(module_settings: Settings, data_root: Path) -> Iterator[httpx.Client]:
    settings = module_settings.model_copy(update={"fit_data_root": data_root})
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60.0) as http:
        yield http


def run(client: httpx.Client, name: str, **kwargs: object) -> dict:
    response = client.post(FIT.format(name=name), headers=AUTH, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 202, response.text
    return wait_job(client, response.json()["id"])


def test_a_folder_and_an_archive_under_the_data_root(client: httpx.Client) -> None:
    for name, source in (("from-folder", "digits"), ("from-tar", "archives/digits.tar")):
        job = run(client, name, json={"source": source, "detector_class": "Mahalanobis", "tpr": 0.9})
        assert job["state"] == "done" and job["data"] == "source", job
        assert job["result"]["metrics"]["AUROC"] > 0.95 and job["result"]["target_tpr"] == 0.9


@pytest.mark.parametrize("source", ["../outside", "/etc", "away/more", "nope", "digits/../../x"])
def test_nothing_outside_the_data_root_is_reachable(client: httpx.Client, data_root: Path, source: str) -> None:
    refused = client.post(FIT.format(name="escape"), json={"source": source, "detector_class": "KNN"}, headers=AUTH)
    assert refused.status_code == 400, refused.text
    assert "data root" in refused.json()["detail"] and str(data_root) not in refused.json()["detail"]
    assert client.get("/v1/jobs", params={"state": "queued"}).json()["jobs"] == []


def test_a_link_inside_a_folder_that_leaves_the_data_root_fails_the_job(client: httpx.Client) -> None:
    job = run(client, "linked", json={"source": "linked", "detector_class": "KNN"})
    assert job["state"] == "failed" and "links outside the data root" in job["error"], job
    assert "linked" not in client.get("/v1/models/digits").json()["detectors"]


def test_a_multipart_file_and_form_parameters(client: httpx.Client) -> None:
    data = tar_of(list(digit_members()), mode="w:gz")
    files = {"file": ("digits.tgz", data, "application/gzip")}
    form = {"detector_class": "KNN", "hparams": '{"k": 3}', "calibration_share": "0.2", "seed": "7"}
    job = run(client, "from-form", files=files, data=form)
    assert job["state"] == "done", job
    assert job["parameters"]["hparams"] == {"k": 3} and job["parameters"]["seed"] == 7
    assert job["result"]["calibration_size"] == 24  # 20% of each class's 20


def test_precomputed_outputs(client: httpx.Client) -> None:
    from ood_core.data import load_split
    from ood_core.zoo import load_classifier, normalize
    from service.fit.sources import write_outputs

    images, labels = load_split("train")
    network = load_classifier(device="cpu")
    with torch.no_grad():
        logits = network(normalize(images[:120]))
    buffer = io.BytesIO()
    path = Path(__file__).parent / ".outputs.safetensors"
    try:
        write_outputs(path, {"logits": logits}, labels[:120])
        buffer.write(path.read_bytes())
    finally:
        path.unlink(missing_ok=True)
    response = client.post(
        f"{FIT.format(name='from-logits')}?detector_class=EnergyBased",
        content=buffer.getvalue(),
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 202, response.text
    job = wait_job(client, response.json()["id"])
    assert job["state"] == "done" and job["data"] == "outputs", job
    digit = client.post("/v1/models/digits/score?detectors=from-logits", files=[("files", ("d.png", digit_png(1)))])
    noise = client.post("/v1/models/digits/score?detectors=from-logits", files=[("files", ("n.png", noise_png(1)))])
    assert digit.status_code == noise.status_code == 200
    needs_features = client.post(
        f"{FIT.format(name='x')}?detector_class=Mahalanobis",
        content=buffer.getvalue(),
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )
    failed = wait_job(client, needs_features.json()["id"])
    assert failed["state"] == "failed" and "'features'" in failed["error"], failed
