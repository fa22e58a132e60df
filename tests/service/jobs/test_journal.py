"""Job records on disk and restart recovery: a job no live process owns is failed "interrupted by a restart" with
its spool and lock removed; a job another process owns (a replica on the same volume) is left alone; finished
records are kept, the last ``keep`` of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.jobs.journal import JobJournal, new_job_id
from service.jobs.records import INTERRUPTED, FitParameters, JobRecord, JobState, utc_now

HOLD = """
import sys
from pathlib import Path
from service.jobs.journal import JobJournal
fd = JobJournal(Path(sys.argv[1])).claim(sys.argv[2])
print("held", flush=True)
sys.stdin.readline()
"""


def record(state: JobState, created: str | None = None) -> JobRecord:
    job_id = new_job_id()
    return JobRecord(
        id=job_id,
        model="m",
        detector="d",
        detector_class="KNN",
        state=state,
        data="archive",
        parameters=FitParameters(detector_class="KNN"),
        created_at=created or utc_now(),
        spool=f"{job_id}/upload.zip",
    )


def test_recovery_fails_the_jobs_of_dead_processes_and_leaves_live_ones(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / ".jobs")
    dead_running, dead_queued, done, live = (record(s) for s in ("running", "queued", "done", "running"))
    for job in (dead_running, dead_queued, done, live):
        journal.save(job)
        (journal.spool_dir(job.id) / "upload.zip").write_bytes(b"data")
    journal.spool_dir("0000000000000000")  # a spool of a request that died before its job was recorded
    (journal.folder / f"{dead_running.id}.lock").touch()  # its owner died holding nothing any more
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(journal.folder), live.id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        interrupted = journal.recover()
        assert sorted(r.id for r in interrupted) == sorted([dead_running.id, dead_queued.id])
        for job in (dead_running, dead_queued):
            again = journal.load(job.id)
            assert again is not None and again.state == "failed" and again.error == INTERRUPTED
            assert again.finished_at is not None and not (journal.spool_root / job.id).exists()
        assert journal.load(done.id) == done and not (journal.spool_root / done.id).exists()
        assert journal.load(live.id) == live and (journal.spool_root / live.id / "upload.zip").exists()
        assert sorted(p.name for p in journal.spool_root.iterdir()) == [live.id]
        assert [p.stem for p in journal.folder.glob("*.lock")] == [live.id]
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(10)
    assert [r.id for r in journal.recover()] == [live.id]  # its owner is gone now


def test_prune_keeps_the_newest_finished_records_and_every_unfinished_one(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path)
    jobs = [record("done", f"2026-01-01T00:00:0{i}.000Z") for i in range(5)] + [record("queued")]
    for job in jobs:
        journal.save(job)
    assert sorted(journal.prune(2)) == sorted(j.id for j in jobs[:3])
    assert [r.id for r in journal.load_all()] == [j.id for j in jobs[3:]]
    assert journal.load("not-an-id") is None and journal.load("../../etc/passwd") is None
