"""The streaming fit shared by the detectors whose state is class-conditional Gaussians on one feature layer.

:class:`ClassGaussianFit` folds every batch of (spatially pooled) features into one
:class:`~ood_core.gaussian.ClassGaussianStats` and hands the finished statistics to the subclass's
:meth:`~ClassGaussianFit._store_gaussians`, which turns them into its state buffers.
:class:`~ood_core.detector.Mahalanobis` and :class:`~ood_core.detector.RMD` use it.
:class:`~ood_core.detector.MultiMahalanobis` does not: it keeps one set of statistics per layer and pads
their widths into one state.
"""

from __future__ import annotations

from abc import abstractmethod

from torch import Tensor

from ood_core.api import Detector
from ood_core.gaussian import ClassGaussianStats, pooled_features


class ClassGaussianFit(Detector):
    """Fit hooks and sizes of a detector with class means ``mu`` (``C x D``) fitted from one streaming pass.

    Subclasses declare ``mu`` (and whatever else :meth:`_store_gaussians` sets) in their ``state_spec``.
    The fit is one pass; its statistics (:meth:`ClassGaussianStats.to_tensors`) merge across shards with
    the parallel formula of :meth:`ClassGaussianStats.merge`.
    """

    requires_fit = True
    input_kind = "features"

    #: class means, ``C x D`` (a buffer of the subclass's ``state_spec``)
    mu: Tensor

    @property
    def feature_dim(self) -> int | None:
        return int(self.mu.shape[1]) if self.is_fitted else None

    @property
    def num_classes(self) -> int | None:
        return int(self.mu.shape[0]) if self.is_fitted else None

    @property
    def n_classes(self) -> int | None:
        """Number of classes the model is fitted for (pytorch-ood's name for :attr:`num_classes`)."""
        return self.num_classes

    def _begin_fit(self) -> None:
        self._stats = ClassGaussianStats()

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        self._stats.update(pooled_features(z), y)

    def _finish_fit(self) -> None:
        self._store_gaussians(self._stats)
        self._stats = ClassGaussianStats()

    def _fit_statistics(self) -> dict[str, Tensor]:
        """Per-class counts, reference points, shifted sums and the pooled scatter (float64, see
        :meth:`ClassGaussianStats.to_tensors`); merged with the parallel formula."""
        return self._stats.to_tensors()

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        self._stats.merge(stats, self.device)

    @abstractmethod
    def _store_gaussians(self, stats: ClassGaussianStats) -> None:
        """Set the fitted state from the statistics of all fit batches (``stats.finish()`` and the like)."""
