"""Keeps a replica's active detectors in step with a state directory that other replicas write too.

Several replicas (Kubernetes pods on one ReadWriteMany volume) share ``<state_dir>``. An upload or delete
reaches one replica, which stores it and swaps it in at once; every other replica notices the change at its next
sync (every ``OOD_STATE_SYNC_S`` seconds) by comparing each stored ``active.json`` (version, sha256) with what it
serves. A changed state is read, checked against its sha256, validated and loaded exactly as at start-up, then
swapped in; a state gone from disk is dropped. A state that fails to load is logged and the old one kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from service.engine.active import ActiveDetector
from service.engine.served_model import ServedModel
from service.states.manager import StateManager
from service.states.validate import build_detector

logger = logging.getLogger("service.sync")


@dataclass
class SyncReport:
    """What one pass changed, as ``(model, detector)`` pairs."""

    loaded: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.removed)


def sync_model(states: StateManager, model: ServedModel, report: SyncReport) -> None:
    """One pass over one model's stored states (blocking: file reads and detector loading).

    The served detectors are read before the directory is listed: an install on this replica writes the disk
    before it swaps memory, so whatever the snapshot holds is already on disk. A swap applies only where the
    served detector is still the one compared (compare-and-swap), so a concurrent install is never undone.
    """
    served = dict(model.detectors)
    stored = {state.name: state for state in states.store.list_states(model.name)}
    loaded: dict[str, ActiveDetector] = {}
    for name, state in stored.items():
        active = served.get(name)
        if active is not None and (active.stored.version, active.stored.sha256) == (state.version, state.sha256):
            continue
        try:
            info, data = states.store.read(model.name, name)
            loaded[name] = ActiveDetector(name=name, detector=build_detector(model, data), stored=info)
        except Exception:
            # a state half-way through being replaced, or one this replica cannot serve: keep the old one
            logger.exception("cannot sync stored state", extra={"model": model.name, "detector": name})
            report.failed.append((model.name, name))
    gone = [name for name in served if name not in stored]
    if not loaded and not gone:
        return
    with states.write_lock:
        current = dict(model.detectors)
        for name, active in loaded.items():
            if current.get(name) is served.get(name):
                current[name] = active
                report.loaded.append((model.name, name))
        for name in gone:
            if current.get(name) is served[name]:
                del current[name]
                report.removed.append((model.name, name))
        model.detectors = current


def sync_once(states: StateManager, models: Iterable[ServedModel]) -> SyncReport:
    """Bring every served model's detectors in line with the state directory (blocking)."""
    report = SyncReport()
    for model in list(models):
        sync_model(states, model, report)
    if report.changed:
        logger.info(
            "detector states synced",
            extra={
                "loaded": [f"{m}/{d}" for m, d in report.loaded],
                "removed": [f"{m}/{d}" for m, d in report.removed],
            },
        )
    return report


async def run_sync_loop(states: StateManager, models: Iterable[ServedModel], interval_s: float) -> None:
    """Call :func:`sync_once` in a worker thread every ``interval_s`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(sync_once, states, models)
        except Exception:
            logger.exception("state sync failed")
