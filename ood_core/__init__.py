"""ood_core: out-of-distribution detectors, training losses and metrics in pure PyTorch.

Convention (as in pytorch-ood): detectors return outlier scores where *higher means more OOD*;
labels < 0 mark OOD samples.

Training-side modules: :mod:`ood_core.loss` (objectives), :mod:`ood_core.metrics` (OODMetrics, per-metric classes,
:mod:`ood_core.metrics.functional`), :mod:`ood_core.search` (``GridSearch`` over detector hyperparameters) and
:mod:`ood_core.augment` (PixMix, outlier pasting).
"""

__version__ = "0.1.0"
