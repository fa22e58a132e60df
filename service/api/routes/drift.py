"""GET /v1/models/{model}/drift: per active detector, the sliding window of recent p-values and its two drift
tests (:mod:`service.engine.drift`); the same readings as the ``ood_drift_*`` gauges of ``/metrics``."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.deps import ReadableModel, Services
from service.api.problems import problem_responses
from service.api.schemas import DetectorDrift, DriftResponse
from service.engine.served_model import ServedModel
from service.metrics import ServiceMetrics

router = APIRouter(prefix="/v1/models/{model}", tags=["models"])


def drift_response(model: ServedModel, metrics: ServiceMetrics) -> DriftResponse:
    drift = metrics.drift
    detectors = model.detectors
    drift.prune(model.name, set(detectors))
    segmentation = model.task == "segmentation"
    out: dict[str, DetectorDrift] = {}
    for name, active in sorted(detectors.items()):
        reading = drift.reading(model.name, active, segmentation=segmentation)
        out[name] = DetectorDrift(**{k: v for k, v in asdict(reading).items() if k != "detector"})
    return DriftResponse(model=model.name, alpha=drift.alpha, detectors=out)


@router.get("/drift", response_model=DriftResponse, responses=problem_responses(404, 422, 503))
async def get_drift(model: ReadableModel, services: Services) -> DriftResponse:
    """Per detector: the window of the last ``OOD_DRIFT_WINDOW`` scored images, their OOD share against the
    expected one (exact one-sided test) and a Kolmogorov-Smirnov test of their conformal p-values against uniform;
    ``drifting`` when a p-value is below ``OOD_DRIFT_ALPHA``. Tests run in the thread pool, at most once per
    ``OOD_DRIFT_REFRESH_S`` while images arrive."""
    return await run_in_threadpool(drift_response, model, services.metrics)
