"""What a model serves: a loaded detector (:class:`ActiveDetector`) and the stored version it came from
(:class:`StoredState`, written by :class:`service.states.store.StateStore`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ood_core.api import Detector


@dataclass(frozen=True)
class StoredState:
    """Description of the active version of one detector state (the content of its ``active.json``)."""

    model: str
    name: str
    version: int
    sha256: str
    size_bytes: int
    detector_class: str
    uploaded_at: str

    def public(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


@dataclass(frozen=True, eq=False)
class ActiveDetector:
    """A loaded detector and the stored version it came from (immutable: a swap replaces the object, so an
    in-flight request keeps using the one it resolved)."""

    name: str
    detector: Detector
    stored: StoredState
    thresholds: dict[float | None, float] = field(default_factory=dict, repr=False)
    """Calibration thresholds by requested TPR (``None``: the target), computed once."""

    @property
    def input_kind(self) -> str:
        return self.detector.input_kind
