"""Install, remove and load the detectors a model serves: validated, stored, then swapped in.

Every change of a model's detectors (an install, a delete, a sync's swap) holds :attr:`StateManager.write_lock`;
the detector dict is replaced as a whole (copy-on-write), so a request that resolved its detectors keeps them.
An install of the bytes already active changes nothing (no new version, the served detector stays); a rollback
copies a kept version into a new upload and installs it like one, as the next version.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from ood_core.api import InvalidStateError
from service.engine.active import ActiveDetector
from service.engine.served_model import ServedModel
from service.settings import check_name
from service.states.store import StateStore
from service.states.validate import build_detector
from service.states.versions import DEFAULT_KEEP, UPLOAD, VersionOrigin

logger = logging.getLogger("service.states")


class StateManager:
    """The state store of the service and the one lock over every detector change."""

    def __init__(self, state_dir: Path, keep: int = DEFAULT_KEEP) -> None:
        self.store = StateStore(state_dir, keep)
        self.write_lock = threading.Lock()
        """Held by every change of a model's detectors: installs, deletes and the sync's swaps."""

    def install(self, model: ServedModel, name: str, data: bytes, origin: VersionOrigin = UPLOAD) -> ActiveDetector:
        """Validate ``data`` against ``model``, store it, then swap it in (blocking: call in a thread)."""
        check_name("detector", name)
        with self.store.upload() as upload:
            upload.file.write(data)
            upload.file.flush()  # validation reads the file
            return self.install_file(model, name, upload.path, origin)

    def install_file(self, model: ServedModel, name: str, path: Path, origin: VersionOrigin = UPLOAD) -> ActiveDetector:
        """Validate the upload file ``path`` (:meth:`StateStore.upload`) against ``model`` (nothing changes if it
        is refused), rename it into place as the next version, then swap it in; memory holds the loaded tensors,
        never the file's bytes too (blocking: call in a thread). The bytes of the active version change nothing."""
        check_name("detector", name)
        detector = build_detector(model, path)
        with self.write_lock:
            stored = self.store.put_file(model.name, name, path, type(detector).__name__, origin)
            current = model.detectors.get(name)
            if current is not None and (current.stored.version, current.stored.sha256) == (
                stored.version,
                stored.sha256,
            ):
                logger.info("detector unchanged: same bytes", extra={"model": model.name, "detector": name})
                return current
            active = ActiveDetector(name=name, detector=detector, stored=stored)
            model.detectors = {**model.detectors, name: active}
        logger.info(
            "detector installed",
            extra={"model": model.name, "detector": name, "version": stored.version, "source": origin.source},
        )
        return active

    def rollback(self, model: ServedModel, name: str, version: int) -> ActiveDetector:
        """Validate the kept ``version`` and make it active as the next version (blocking). The version file is
        streamed into an upload (never whole in memory); the active version itself changes nothing."""
        check_name("detector", name)
        entry, source = self.store.open_version(model.name, name, version)
        with source, self.store.upload() as upload:
            digest = hashlib.sha256()
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                upload.file.write(chunk)
            upload.file.flush()
            if digest.hexdigest() != entry.sha256:
                raise InvalidStateError(f"stored version {version} of {name!r} does not match its sha256")
            active = self.install_file(model, name, upload.path, VersionOrigin("rollback", rollback_of=entry.version))
        return active

    def remove(self, model: ServedModel, name: str) -> None:
        """Delete the stored state and stop serving it (blocking)."""
        check_name("detector", name)
        with self.write_lock:
            self.store.delete(model.name, name)
            model.detectors = {k: v for k, v in model.detectors.items() if k != name}
        logger.info("detector deleted", extra={"model": model.name, "detector": name})

    def load_stored(self, model: ServedModel) -> None:
        """Serve every state stored for ``model`` (start-up); one that fails to load is logged and skipped."""
        for stored in self.store.list_states(model.name):
            try:
                info, data = self.store.read(model.name, stored.name)
                active = ActiveDetector(name=stored.name, detector=build_detector(model, data), stored=info)
            except Exception:
                logger.exception("cannot load stored state", extra={"model": model.name, "detector": stored.name})
                continue
            with self.write_lock:
                model.detectors = {**model.detectors, stored.name: active}
