"""A server (``python -m service``) killed or stopped during a fit job: after the restart the job is listed as
failed, "interrupted by a restart", its spool file is gone and every state is kept as it was."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import AUTH, subprocess_server
from tests.service.jobs.archives import digits_zip, wait_job

pytestmark = pytest.mark.timeout(300)


def states_of(url: str) -> dict[str, tuple[int, str]]:
    listing = httpx.get(f"{url}/v1/models/digits/detectors").json()["detectors"]
    return {d["name"]: (d["version"], d["sha256"]) for d in listing}


def start_slow_job(url: str) -> str:
    response = httpx.post(
        f"{url}/v1/models/digits/detectors/mahalanobis/fit?detector_class=Mahalanobis&batch_size=1",
        content=digits_zip(per_class=100, ood=0, repeat=4),
        headers={**AUTH, "Content-Type": "application/zip"},
        timeout=60.0,
    )
    assert response.status_code == 202, response.text
    job_id = str(response.json()["id"])
    with httpx.Client(base_url=url) as client:
        running = wait_job(client, job_id, until=("running",))
        assert running["state"] == "running", running
    return job_id


def check_interrupted(url: str, states: Path, job_id: str, before: dict[str, tuple[int, str]]) -> None:
    job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert job["state"] == "failed" and job["error"] == "interrupted by a restart" and job["result"] is None
    assert job_id in [j["id"] for j in httpx.get(f"{url}/v1/jobs", params={"state": "failed"}).json()["jobs"]]
    assert list((states / ".jobs" / "spool").iterdir()) == []
    assert not list((states / ".jobs").glob("*.lock"))
    assert states_of(url) == before
    events = httpx.get(f"{url}/v1/jobs/{job_id}/events").text
    assert "event: job" in events and "interrupted by a restart" in events


def test_a_restart_during_a_job_lists_it_as_interrupted_and_keeps_every_state(
    demo_state_dir: Path, tmp_path: Path
) -> None:
    """First a SIGKILL (nothing runs at exit: the next start recovers), then a SIGTERM (a graceful stop)."""
    states = tmp_path / "states"
    shutil.copytree(demo_state_dir, states)
    log = tmp_path / "server.log"
    with subprocess_server(states, log) as (url, process):
        before = states_of(url)
        killed = start_slow_job(url)
        assert list((states / ".jobs" / "spool").iterdir())  # the upload is on the state volume meanwhile
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    with subprocess_server(states, log) as (url, process):
        check_interrupted(url, states, killed, before)
        stopped = start_slow_job(url)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    with subprocess_server(states, log) as (url, _):
        check_interrupted(url, states, stopped, before)
        assert httpx.get(f"{url}/v1/jobs/{killed}").json()["state"] == "failed"
