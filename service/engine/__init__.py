"""Everything that runs a model, with no web framework: the HTTP layer (:mod:`service.api`), the offline fit and
the benchmarks all import it directly.

Module map, in the order a request passes through:

* :mod:`~service.engine.submit`: the one entry point of a scoring request: check the route's task, resolve the
  requested detectors, decode the images (:mod:`~service.engine.decode`), submit them to the model's batcher and
  wait for the finished results; also wires a model's batcher to :func:`~service.engine.scoring.process_batch`.
* :mod:`~service.engine.decode`: encoded bytes -> Pillow image within the pixel limit (header checked first);
  :mod:`~service.engine.tensors`: pixel tensors sent already decoded (the V2 protocol's ``UINT8`` / ``FP32``
  inputs) -> the same per-image input, through the same preprocessing.
* :mod:`~service.engine.preprocess`: the one preprocessing path (scoring and fitting): image -> ``uint8`` pixels
  on the CPU, then ``(x / 255 - mean) / std`` on the device.
* :mod:`~service.engine.batcher`: :class:`DynamicBatcher`, which collects the images of concurrent requests into
  one call of the model in one worker thread (adaptive: an idle worker starts at once, a busy one lets arrivals
  accumulate; a batch closed while the worker computes is prepared meanwhile); :mod:`~service.engine.batch_admission`:
  its bounded queue, admission, deadlines and announcements; :mod:`~service.engine.batch_parts`:
  its errors, observer protocol, queued items, closed batches and wake-ups; :mod:`~service.engine.threads`: the
  worker's intra-op threads per batch size (CPU), measured at warm-up.
* :mod:`~service.engine.devices`: device choice, reduced precision, cuDNN settings, batch padding and staging
  (pinned memory, copies on a side stream on CUDA).
* :mod:`~service.engine.scoring`: what the worker runs per batch: one forward, each detector on the rows that asked
  for it, verdicts (:mod:`~service.engine.verdicts`) and the score metrics, observed here and nowhere else.
* :mod:`~service.engine.items`: what travels through the batcher (:class:`ScoreItem` in, :class:`ItemResult` out).
* :mod:`~service.engine.served_model`: :class:`ServedModel` (network, feature extractor, preprocessing, active
  detectors, batcher) built from a :class:`~service.settings.ModelConfig` by :mod:`~service.engine.networks`
  (``torchvision.models.get_model`` or the demo zoo, weights from safetensors).
* :mod:`~service.engine.active`: :class:`ActiveDetector`, a loaded detector and the stored version it came from.
* :mod:`~service.engine.catalog`: :class:`ModelCatalog`, the served models by name and whether they are ready.
* :mod:`~service.engine.drift`: :class:`DriftMonitor`, per model and detector a sliding window of conformal
  p-values (fed by the score metrics) and its two drift tests, computed when read.
"""
