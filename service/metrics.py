"""Prometheus metrics of one app instance (own registry, so several apps can live in one process).

Who feeds what: the HTTP middleware the request counts and latencies (:meth:`ServiceMetrics.observe_request`),
the batcher the batch sizes, queue waits and compute times (:meth:`ServiceMetrics.on_batch`), the batch worker
the images, scores, verdicts and p-values (:meth:`ServiceMetrics.observe_scores`), once per detector and batch;
queue depths and active state versions are read from the models at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.engine.served_model import ServedModel

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SCORE_BUCKETS = (-1000, -100, -50, -20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 50, 100, 1000)
P_VALUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class _LiveCollector(Collector):
    """Queue depth and active state versions, read from the models at scrape time."""

    def __init__(self, models: Iterable[ServedModel]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("ood_queue_depth", "Images waiting in the model's batch queue", labels=["model"])
        states = GaugeMetricFamily(
            "ood_detector_state_info",
            "Active detector state (value 1) with its version and sha256",
            labels=["model", "detector", "detector_class", "version", "sha256"],
        )
        for model in self._models:
            batcher = model.batcher
            depth.add_metric([model.name], float(batcher.queue_depth if batcher is not None else 0))
            for name, active in sorted(model.detectors.items()):
                stored = active.stored
                states.add_metric([model.name, name, stored.detector_class, str(stored.version), stored.sha256], 1.0)
        yield depth
        yield states


class ServiceMetrics:
    """All metrics; also the batchers' :class:`~service.engine.batcher.BatchObserver` and the batch worker's
    :class:`~service.engine.scoring.ScoreObserver`. ``models`` is iterated at every scrape."""

    def __init__(self, models: Iterable[ServedModel]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ood_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "ood_http_request_duration_seconds",
            "HTTP request latency by route and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ood_batch_size", "Images per model forward", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "ood_queue_wait_seconds",
            "Time an image waited before its batch ran",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "ood_batch_compute_seconds",
            "Forward + detectors time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("ood_images_scored", "Images scored", ["model", "route"], registry=r)
        self.verdicts = Counter(
            "ood_verdicts", "OOD verdicts by detector", ["model", "detector", "verdict"], registry=r
        )
        self.scores = Histogram(
            "ood_score",
            "Outlier scores per detector, for drift (segmentation: the per-image maximum)",
            ["model", "detector"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.p_values = Histogram(
            "ood_p_value",
            "Conformal p-values per detector: uniform while inputs look like the calibration data",
            ["model", "detector"],
            buckets=P_VALUE_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "ood_http_rejected_connections",
            "Connections refused before a request reached the app, by reason (connection_limit, header_timeout, ...)",
            ["reason"],
            registry=r,
        )
        r.register(_LiveCollector(models))
        # labelled children, looked up once per label set (``labels()`` takes a lock and validates every call)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._score_children: dict[tuple[str, str], tuple[Histogram, Histogram, Counter, Counter]] = {}

    def rejected_connection(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def on_batch(self, name: str, size: int, queue_wait_s: list[float], compute_s: float) -> None:
        self.batch_size.labels(name).observe(size)
        wait = self.queue_wait.labels(name)
        for seconds in queue_wait_s:
            wait.observe(seconds)
        self.compute.labels(name).observe(compute_s)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            labels = (method, route, str(status))
            children = self._request_children[key] = (
                self.requests.labels(*labels),
                self.latency.labels(*labels),
            )
        children[0].inc()
        children[1].observe(seconds)

    def _score_metrics(self, model: str, detector: str) -> tuple[Histogram, Histogram, Counter, Counter]:
        key = (model, detector)
        children = self._score_children.get(key)
        if children is None:
            children = self._score_children[key] = (
                self.scores.labels(model, detector),
                self.p_values.labels(model, detector),
                self.verdicts.labels(model, detector, "ood"),
                self.verdicts.labels(model, detector, "id"),
            )
        return children

    def observe_images(self, model: str, task: str, count: int) -> None:
        self.images.labels(model, "segment" if task == "segmentation" else "score").inc(count)

    def observe_scores(
        self,
        model: str,
        detector: str,
        scores: list[float],
        is_ood: list[bool | None],
        p_values: list[float | None],
    ) -> None:
        """One detector's scores, verdicts and p-values of one batch (called from the batch worker thread)."""
        histogram, p_histogram, ood, in_distribution = self._score_metrics(model, detector)
        for score in scores:
            histogram.observe(score)
        flagged = sum(1 for v in is_ood if v is True)
        passed = sum(1 for v in is_ood if v is False)
        if flagged:
            ood.inc(flagged)
        if passed:
            in_distribution.inc(passed)
        for p_value in p_values:
            if p_value is not None:
                p_histogram.observe(p_value)
