"""ood_core: out-of-distribution detectors, training losses and metrics in pure PyTorch.

Convention (as in pytorch-ood): detectors return outlier scores where *higher means more OOD*;
labels < 0 mark OOD samples.

Detector core: :mod:`ood_core.api` (the ``Detector`` base, ``TensorSpec``; re-exports the names below),
:mod:`ood_core.fitting_protocol` (the mergeable, resumable fit: ``MergeableFit``), :mod:`ood_core.fit_signature`
(the tag that fit statistics carry), :mod:`ood_core.constructor_args` (``model`` / ``encoder`` alias, required
arguments), :mod:`ood_core.errors`, :mod:`ood_core.detector` (one module per detector). Shared math:
:mod:`ood_core.gaussian` (streaming, mergeable class Gaussian statistics) and :mod:`ood_core.mahalanobis_kernels`
(precision matrices, Mahalanobis distances). Fitted state: :mod:`ood_core.state` (save / load; its metadata in
:mod:`ood_core.state_metadata`, byte-deterministic writing in :mod:`ood_core.state_write`),
:mod:`ood_core.fit_checkpoint`, :mod:`ood_core.distributed` (merging fits across ranks).

Training-side modules: :mod:`ood_core.loss` (objectives), :mod:`ood_core.metrics` (OODMetrics, per-metric classes,
:mod:`ood_core.metrics.functional`), :mod:`ood_core.search` (``GridSearch`` over detector hyperparameters; its data in
:mod:`ood_core.search_outputs`) and
:mod:`ood_core.augment` (PixMix, outlier pasting).
"""

__version__ = "0.1.0"
