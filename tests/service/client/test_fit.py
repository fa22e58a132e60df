"""Fit jobs through the client against the real service: ``fit`` follows the job's event stream to its end with a
progress bar, ``jobs`` / ``job`` / ``cancel_job``, the small images + labels form, and the async client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ood_core.data import load_split
from service.client import AsyncOODClient, Job, OODClient, ProblemError
from tests.service.conftest import API_KEY, digit_png, noise_png
from tests.service.jobs.archives import digits_zip

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fit") / "digits.zip"
    path.write_bytes(digits_zip())  # 20 digits per class (0-5) and 20 noise images under ood/
    return path


def test_fit_follows_the_job_with_a_progress_bar_to_its_result(
    live_server: str, archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Job] = []
    with OODClient(live_server, api_key=API_KEY) as client:
        job = client.fit(
            "digits", "client-fit", archive, detector_class="Mahalanobis", batch_size=8, on_progress=seen.append
        )
        assert job.state == "done" and job.finished and job.result is not None
        assert job.images_done == job.images_total == 140 and job.result.metrics is not None
        assert job.result.metrics["AUROC"] > 0.95
        done = [j.images_done for j in seen if j.state == "running" and j.images_done > 0]
        assert len(done) >= 3 and done == sorted(done) and done[0] < done[-1]  # it progressed, in order
        assert seen[-1] == job
        bar = capsys.readouterr().err
        assert "fit digits/client-fit" in bar and "140/140" in bar
        assert client.job(job.id) == job
        assert job.id in [j.id for j in client.jobs(model="digits", state="done")]
        assert client.jobs(model="digits-seg") == []
        answer = client.score("digits", [digit_png(0), noise_png(2)], detectors="client-fit")
        verdicts = [r.detectors["client-fit"] for r in answer.results]
        assert verdicts[0].version == job.result.version and verdicts[1].is_ood is True


def test_a_small_labelled_set_and_a_cancel(live_server: str, archive: Path) -> None:
    with OODClient(live_server, api_key=API_KEY) as client:
        images = [digit_png(i, split="train") for i in range(24)]
        labels = load_split("train")[1][:24].tolist()
        job = client.fit(
            "digits",
            "client-small",
            images=images,
            labels=labels,
            detector_class="KNN",
            hparams={"k": 3},
            progress=False,
        )
        assert job.state == "done" and job.data == "images" and job.parameters.hparams == {"k": 3}, job.error
        slow = archive.with_name("slow.zip")
        slow.write_bytes(digits_zip(per_class=100, ood=0, repeat=4))  # 2400 images: seconds at batch_size=1
        queued = client.start_fit("digits", "client-cancel", slow, detector_class="Mahalanobis", batch_size=1)
        cancelled = client.cancel_job(queued.id)
        assert cancelled.state == "cancelled" and cancelled.result is None
        assert client.follow(queued.id, progress=False) == client.job(queued.id)  # an ended job's stream: its end
        with pytest.raises(ProblemError) as err:
            client.start_fit("digits", "x", source="data", detector_class="Mahalanobis")
        assert err.value.status == 400 and "OOD_FIT_DATA_ROOT" in err.value.detail
        with pytest.raises(ProblemError) as err:
            client.start_fit("digits", "x", archive, detector_class="NoSuchDetector")
        assert err.value.status == 400 and "Mahalanobis" in err.value.detail  # it lists the classes it can fit
        with pytest.raises(ValueError, match="exactly one of"):
            client.start_fit("digits", "x", archive, source="data", detector_class="KNN")


def test_the_async_client_fits_and_scores(live_server: str, archive: Path) -> None:
    async def scenario() -> tuple[Job, list[Job], float | None]:
        async with AsyncOODClient(live_server, api_key=API_KEY) as client:
            seen: list[Job] = []
            job = await client.fit(
                "digits", "client-async", archive, detector_class="Mahalanobis", progress=False, on_progress=seen.append
            )
            listed = await client.jobs(model="digits")
            answer = await client.score("digits", noise_png(5), detectors=["client-async"])
            assert seen and seen[-1] == job
            return job, listed, answer.results[0].detectors["client-async"].score

    job, listed, score = asyncio.run(scenario())
    assert job.state == "done" and job.result is not None and job.id in [j.id for j in listed]
    assert score is not None and job.result.threshold is not None and score > job.result.threshold
