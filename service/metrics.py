"""Prometheus metrics of one app instance (own registry, so several apps can live in one process).

Who feeds what: the HTTP middleware the request counts and latencies (:meth:`ServiceMetrics.observe_request`),
the batcher the batch sizes, queue waits and compute times (:meth:`ServiceMetrics.on_batch`), the batch worker
the images, scores, verdicts and p-values (:meth:`ServiceMetrics.observe_scores`), once per detector and batch;
queue depths and active state versions are read from the models at scrape time; the fit jobs
(:mod:`service.jobs`) report images fitted and each ended job (:meth:`ServiceMetrics.on_job_finished`), their
queued / running counts are read at scrape time. The p-values also go into the
drift windows (:attr:`ServiceMetrics.drift`, :mod:`service.engine.drift`), whose tests run at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.engine.active import ActiveDetector
from service.engine.drift import DriftMonitor
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


class _DriftCollector(Collector):
    """The drift tests of every calibrated detector's window (:mod:`service.engine.drift`), at scrape time."""

    FAMILIES = (
        ("filled", "ood_drift_window_images", "Images in the detector's drift window"),
        ("ood_share", "ood_drift_ood_share", "Share of the window's images OOD at the default threshold"),
        ("expected_share", "ood_drift_expected_ood_share", "Expected OOD share in distribution (about 1 - tpr)"),
        ("share_p_value", "ood_drift_share_p_value", "p-value of the window's OOD share (beta-binomial, one-sided)"),
        ("ks_statistic", "ood_drift_ks_statistic", "Kolmogorov-Smirnov distance of the window's p-values to uniform"),
        ("ks_p_value", "ood_drift_ks_p_value", "p-value of the KS test of the window's p-values against uniform"),
        ("drifting", "ood_drift_drifting", "1 when a drift p-value is below OOD_DRIFT_ALPHA"),
    )

    def __init__(self, models: Iterable[ServedModel], drift: DriftMonitor) -> None:
        self._models, self._drift = models, drift

    def collect(self) -> Iterator[Metric]:
        families = {
            field: GaugeMetricFamily(name, text, labels=["model", "detector"]) for field, name, text in self.FAMILIES
        }
        for model in self._models:
            detectors = model.detectors
            self._drift.prune(model.name, set(detectors))
            if model.task != "classification":
                continue
            for name, active in sorted(detectors.items()):
                if active.detector.calibration is None:
                    continue
                reading = self._drift.reading(model.name, active)
                for field, family in families.items():
                    value = getattr(reading, field)
                    if value is not None:
                        family.add_metric([model.name, name], float(value))
        yield from families.values()


JOB_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class _JobsCollector(Collector):
    """This process's queued and running fit jobs by model and state (``service.jobs``), at scrape time."""

    def __init__(self) -> None:
        self.counts: Callable[[], dict[tuple[str, str], int]] = dict

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "state"]
        family = GaugeMetricFamily("ood_fit_jobs", "Fit jobs of this replica queued or running", labels=labels)
        counts = self.counts()
        for model, state in sorted({*counts, *((m, s) for m, _ in counts for s in ("queued", "running"))}):
            family.add_metric([model, state], float(counts.get((model, state), 0)))
        yield family


class ServiceMetrics:
    """All metrics; also the batchers' :class:`~service.engine.batcher.BatchObserver` and the batch worker's
    :class:`~service.engine.scoring.ScoreObserver`. ``models`` is iterated at every scrape."""

    def __init__(self, models: Iterable[ServedModel]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # the standard process_* (CPU, memory, file descriptors), python_info and python_gc_* families
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
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
        self.detector_compute = Histogram(
            "ood_detector_compute_seconds",
            "Time per batch of each detector that runs the network itself (ODIN, MCD, GradNorm, ...) or reads several "
            "layers (Gram, MultiMahalanobis)",
            ["model", "detector"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
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
        self.fit_images = Counter(
            "ood_fit_images", "Images (or output rows) read by fit jobs, by model", ["model"], registry=r
        )
        self.jobs_finished = Counter(
            "ood_fit_jobs_finished", "Fit jobs ended, by model and final state", ["model", "state"], registry=r
        )
        self.job_duration = Histogram(
            "ood_fit_job_duration_seconds",
            "Run time of fit jobs (start to end), by model and final state",
            ["model", "state"],
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self._jobs = _JobsCollector()
        r.register(self._jobs)
        self._models = models
        self.drift = DriftMonitor()
        """Sliding windows of p-values per model and detector (sized by ``OOD_DRIFT_WINDOW``: :meth:`configure_drift`)."""
        r.register(_DriftCollector(models, self.drift))
        # labelled children, looked up once per label set (``labels()`` takes a lock and validates every call)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._score_children: dict[tuple[str, str], tuple[Histogram, Histogram, Counter, Counter]] = {}

    def configure_drift(self, window: int, alpha: float, refresh_s: float) -> None:
        """Size the drift windows (``OOD_DRIFT_WINDOW``, ``OOD_DRIFT_ALPHA``, ``OOD_DRIFT_REFRESH_S``)."""
        self.drift.configure(window, alpha, refresh_s)

    def _active(self, model: str, detector: str) -> ActiveDetector | None:
        served = next((m for m in self._models if m.name == model), None)
        return None if served is None else served.detectors.get(detector)

    def watch_jobs(self, counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Read the queued and running fit jobs from ``counts`` at every scrape (``JobManager.active_counts``)."""
        self._jobs.counts = counts

    def on_fit_images(self, model: str, count: int) -> None:
        self.fit_images.labels(model).inc(count)

    def on_job_finished(self, model: str, state: str, seconds: float) -> None:
        self.jobs_finished.labels(model, state).inc()
        self.job_duration.labels(model, state).observe(seconds)

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

    def observe_detector_seconds(self, model: str, detector: str, seconds: float) -> None:
        self.detector_compute.labels(model, detector).observe(seconds)

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
        if p_values and p_values[0] is not None:  # calibrated (all or none of a batch's rows have p-values)
            active = self._active(model, detector)
            if active is not None:
                self.drift.observe(model, active, p_values)
