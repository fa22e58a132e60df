"""Writes killed (SIGKILL) at every step in a child process (``crash_child.py``): the active state stays readable
and is the old one before the commit point (``active.json`` renamed) and the new one after; after a cleanup nothing
is left behind. Writes that fail or run out of space: ``test_write_faults.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from service.errors import DetectorNotFoundError
from service.states.store import ACTIVE, CleanupReport, StateStore
from tests.service.states.crash_child import KEEP, NEW, OLD2, SCENARIOS, payload

REPO = Path(__file__).resolve().parents[3]


class Named(NamedTuple):
    op: str
    kill: dict[str, Any]
    committed: bool
    found: dict[str, int]  # what the cleanup must remove: CleanupReport field -> count


VERSION_RENAME = {"call": "replace", "match": ".safetensors"}
COMMIT = {"call": "replace", "match": ACTIVE}
NAMED = {
    "put-before-the-version-rename": Named("put", {**VERSION_RENAME, "when": "before"}, False, {"uploads": 1}),
    "put_file-before-the-version-rename": Named(
        "put_file", {**VERSION_RENAME, "when": "before"}, False, {"uploads": 1}
    ),
    "after-the-version-rename": Named("put_file", {**VERSION_RENAME, "when": "after"}, False, {"versions": 1}),
    "before-the-commit": Named("put", {**COMMIT, "when": "before"}, False, {"versions": 1, "temp_files": 1}),
    "after-the-commit": Named("put", {**COMMIT, "when": "after"}, True, {"versions": 1}),
    "during-the-upload-stream": Named("put_file", {"chunks": 2}, False, {"uploads": 1}),
}
SWEEPS = [("put", "existing"), ("put", "new_detector"), ("put_file", "existing"), ("put_file", "new_model")]


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every job run in one fresh interpreter (``python -m``), each write in a process of its own, then grouped."""
    base = tmp_path_factory.mktemp("crashes")
    jobs: list[dict[str, Any]] = [
        {"id": name, "scenario": "existing", "op": named.op, "kill": named.kill} for name, named in NAMED.items()
    ] + [{"id": f"{op}-{scenario}", "scenario": scenario, "op": op, "kill": {"nth": "all"}} for op, scenario in SWEEPS]
    for job in jobs:
        job.update(root=str(base / job["id"]), trace=str(base / f"{job['id']}.trace"))
    (base / "jobs.json").write_text(json.dumps(jobs))
    child = subprocess.run(
        [sys.executable, "-m", "tests.service.states.crash_child", "sweep", str(base / "jobs.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == 0, child.stderr
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in json.loads(child.stdout.splitlines()[-1]):
        assert run["status"] in ("killed", "done"), child.stderr
        grouped.setdefault(run["id"], []).append(run)
    return grouped


def assert_tidy(root: Path) -> None:
    """No temporary file, upload, trash, folder without ``active.json`` or lock file without its folder."""
    for path in root.rglob("*"):
        where = path.relative_to(root)
        assert not path.name.endswith(".tmp") and not path.name.startswith(".deleted-"), where
        if path.is_dir() and len(where.parts) == 2:
            assert (path / ACTIVE).is_file(), where
        if path.name.endswith(".lock"):
            assert (path.parent / path.name[1 : -len(".lock")]).is_dir(), where
        if path.is_dir() and len(where.parts) == 1 and where.name != ".uploads":
            assert any(path.iterdir()) or where.name == "n", where  # an empty model folder: see crash_child


def version_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("v*.safetensors"))


def check_recovered(run: dict[str, Any]) -> tuple[bool, CleanupReport]:
    """Clean up after a killed write and check the states; whether the write had committed, and the report."""
    root, trace = Path(run["root"]), Path(run["trace"])
    lines = trace.read_text().splitlines() if trace.exists() else []
    committed = any(line.startswith("replace ") and line.endswith(f" {ACTIVE}") for line in lines)
    assert run["status"] == "killed" or committed
    store = StateStore(root, keep=KEEP)
    report = store.cleanup()
    target = SCENARIOS[run["scenario"]]
    expected: dict[tuple[str, str], bytes | None] = {("m", "d"): payload(OLD2)}
    expected[target] = payload(NEW) if committed else (payload(OLD2) if target == ("m", "d") else None)
    for (model, name), data in expected.items():
        if data is None:
            with pytest.raises(DetectorNotFoundError):
                store.read(model, name)
            assert not (root / model / name).exists() and not (root / model / f".{name}.lock").exists()
        else:
            info, read = store.read(model, name)  # checks the sha256 too
            assert read == data and info.size_bytes == len(data)
    kept = {("m", "d"): ["v1.safetensors", "v2.safetensors"]}
    if committed:
        kept[target] = ["v2.safetensors", "v3.safetensors"] if target == ("m", "d") else ["v1.safetensors"]
    for (model, name), files in kept.items():
        assert version_files(root / model / name) == files
    assert_tidy(root)
    assert not store.cleanup().removed  # nothing left for a second pass
    assert store.put("m", "d", b"after", "X").version == (4 if committed and target == ("m", "d") else 3)
    return committed, report


@pytest.mark.parametrize("name", NAMED)
def test_a_write_killed_at_a_named_point(crashes: dict[str, list[dict[str, Any]]], name: str) -> None:
    (run,) = crashes[name]
    assert run["status"] == "killed"
    committed, report = check_recovered(run)
    assert committed == NAMED[name].committed
    found = {key: len(value) for key, value in vars(report).items() if value}
    assert found == NAMED[name].found, report
    if "versions" in found:  # the one never committed, or the one the commit had not removed yet
        assert report.versions == ["m/d/v1.safetensors" if committed else "m/d/v3.safetensors"]


@pytest.mark.parametrize(("op", "scenario"), SWEEPS)
def test_a_write_killed_at_every_step(crashes: dict[str, list[dict[str, Any]]], op: str, scenario: str) -> None:
    runs = crashes[f"{op}-{scenario}"]
    assert runs[-1]["status"] == "done" and all(run["status"] == "killed" for run in runs[:-1])
    committed = [check_recovered(run)[0] for run in runs]
    assert committed.count(False) >= 4 and committed.count(True) >= 2  # kill points before and after the commit
    assert committed == sorted(committed)  # old until the commit point, new from there on
