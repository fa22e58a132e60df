"""Replicas sharing one state directory: an upload or delete on one reaches the others (service.sync)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.settings import Settings
from service.states.store import StateStore
from service.states.sync import sync_once
from tests.service.conftest import AUTH, AppRunner, digit_png

DETECTORS = "/v1/models/digits/detectors"


@pytest.fixture
def replicas(make_settings: Callable[..., Settings]) -> Iterator[tuple[AppRunner, AppRunner]]:
    """Two app instances on the same state directory, with the periodic sync off (the tests drive it)."""
    settings = make_settings(state_sync_s=0)
    first = AppRunner(settings)
    second = AppRunner(settings)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def _versions(runner: AppRunner) -> dict[str, int]:
    response = runner.get(DETECTORS)
    assert response.status_code == 200, response.text
    return {state["name"]: state["version"] for state in response.json()["detectors"]}


def _state(runner: AppRunner, name: str) -> bytes:
    response = runner.get(f"{DETECTORS}/{name}")
    assert response.status_code == 200, response.text
    return response.content


def test_an_upload_on_one_replica_is_served_by_the_other_after_a_sync(replicas: tuple[AppRunner, AppRunner]) -> None:
    first, second = replicas
    data = _state(first, "knn")
    assert first.put(f"{DETECTORS}/knn-copy", content=data, headers=AUTH).status_code == 201
    assert "knn-copy" not in _versions(second)

    report = sync_once(second.context.states, second.context.catalog)

    assert report.loaded == [("digits", "knn-copy")] and not report.failed
    assert _versions(second)["knn-copy"] == 1
    files = {"files": ("d.png", digit_png(), "image/png")}
    scored = second.post("/v1/models/digits/score?detectors=knn-copy", files=files)
    assert scored.status_code == 200, scored.text
    original = second.post("/v1/models/digits/score?detectors=knn", files=files).json()
    assert scored.json()["results"][0]["detectors"]["knn-copy"]["score"] == pytest.approx(
        original["results"][0]["detectors"]["knn"]["score"]
    )
    assert not sync_once(second.context.states, second.context.catalog).changed  # nothing new: nothing reloaded


def test_a_new_version_and_a_delete_reach_the_other_replica(replicas: tuple[AppRunner, AppRunner]) -> None:
    first, second = replicas
    before = _versions(second)["mahalanobis"]
    assert first.put(f"{DETECTORS}/mahalanobis", content=_state(first, "knn"), headers=AUTH).status_code == 200
    assert first.delete(f"{DETECTORS}/msp", headers=AUTH).status_code == 204

    report = sync_once(second.context.states, second.context.catalog)

    assert report.loaded == [("digits", "mahalanobis")]
    assert report.removed == [("digits", "msp")]
    versions = _versions(second)
    assert versions["mahalanobis"] == before + 1 and "msp" not in versions
    assert second.get(f"{DETECTORS}/mahalanobis").content == _state(first, "knn")
    response = second.post(
        "/v1/models/digits/score?detectors=msp", files={"files": ("d.png", digit_png(), "image/png")}
    )
    assert response.status_code == 404


def test_a_broken_stored_state_keeps_the_served_one(replicas: tuple[AppRunner, AppRunner], tmp_path: Path) -> None:
    first, second = replicas
    assert first.put(f"{DETECTORS}/knn", content=_state(first, "mahalanobis"), headers=AUTH).status_code == 200
    folder = Path(first.context.settings.state_dir) / "digits" / "knn"
    newest = max(folder.glob("v*.safetensors"), key=lambda p: int(p.stem[1:]))
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated on disk: its sha256 no longer matches
    served = second.context.catalog.models["digits"].detectors["knn"]

    report = sync_once(second.context.states, second.context.catalog)

    assert report.failed == [("digits", "knn")] and not report.loaded
    assert second.context.catalog.models["digits"].detectors["knn"] is served


def test_a_sync_never_undoes_a_concurrent_install(
    replicas: tuple[AppRunner, AppRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = replicas
    assert first.put(f"{DETECTORS}/knn", content=_state(first, "mahalanobis"), headers=AUTH).status_code == 200
    store = second.context.states.store
    stale_listing = store.list_states("digits")  # lists the first replica's upload
    model = second.context.catalog.models["digits"]

    def list_then_install(name: str) -> list:  # type: ignore[type-arg]
        second.context.states.install(model, "knn", _state(second, "energy"))  # lands while the sync is under way
        return stale_listing

    monkeypatch.setattr(store, "list_states", list_then_install)
    sync_once(second.context.states, second.context.catalog)
    monkeypatch.undo()

    served = second.context.catalog.models["digits"].detectors["knn"]
    assert served.stored.version == store.info("digits", "knn").version  # the newest install, not the stale one
    assert served.stored.detector_class == "EnergyBased"


def test_the_periodic_sync_picks_up_uploads(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(state_sync_s=0.05)
    first, second = AppRunner(settings), AppRunner(settings)
    try:
        assert first.put(f"{DETECTORS}/knn-2", content=_state(first, "knn"), headers=AUTH).status_code == 201
        deadline = time.monotonic() + 30
        while "knn-2" not in _versions(second) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "knn-2" in _versions(second)
    finally:
        first.close()
        second.close()


def test_stores_on_one_directory_never_overwrite_each_others_versions(tmp_path: Path) -> None:
    stores = [StateStore(tmp_path), StateStore(tmp_path)]  # two replicas: separate processes, separate locks

    def put(i: int) -> int:
        return stores[i % 2].put("m", "d", f"state {i}".encode(), "X").version

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(put, range(40)))

    assert sorted(versions) == list(range(1, 41))
    info, data = stores[1].read("m", "d")
    assert info.version == 40  # the active version only moves forward
    assert data == f"state {versions.index(40)}".encode()
