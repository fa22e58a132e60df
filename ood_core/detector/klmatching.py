"""KL-Matching: KL divergence of the posterior to typical per-class posteriors.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt, Song: "Scaling Out-of-Distribution Detection
for Real-World Settings", ICML 2022.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError, TensorSpec, known_mask

#: floor for template probabilities, so that a class the template never saw gives a finite divergence
_MIN_PROB = 1e-12


class KLMatching(Detector):
    r"""Outlier score = smallest KL divergence between the posterior and the typical class posteriors:

    .. math:: d_k = \mathbb{E}_{x' \sim \mathcal{X}_{val},\ \hat y(x') = k}\left[p(\cdot \mid x')\right],
        \qquad s(x) = \min_k D_{KL}\left[p(\cdot \mid x) \,\Vert\, d_k\right]

    The template :math:`d_k` is the mean softmax posterior of the validation samples the model *predicts* as
    class :math:`k` (labels are not needed, only OOD samples with label < 0 are dropped). This follows the
    paper; the seed documentation (and pytorch-ood) instead scores the divergence to the template of the
    predicted class only, :math:`D_{KL}[p \Vert d_{\hat y(x)}]`, which is never smaller than the paper's
    minimum. Classes that no validation sample was predicted as have no template and are left out of the
    minimum (their ``counts`` entry is 0); at least one class must have been predicted.

    The fit streams: it keeps per-class sums of posteriors (float64) and counts. State: ``templates``
    (``C x C``, row :math:`k` is :math:`d_k`) and ``counts`` (``C``, validation samples per predicted class).

    :param model: network that outputs logits (may be ``None`` for the ``*_features`` methods)
    """

    input_kind = "logits"
    requires_fit = True
    state_spec: ClassVar[dict[str, TensorSpec]] = {
        "templates": TensorSpec(("C", "C")),
        "counts": TensorSpec(("C",), torch.int64),
    }

    templates: Tensor
    counts: Tensor

    def __init__(self, model: Any = None) -> None:
        super().__init__()
        self.model = model

    @property
    def num_classes(self) -> int | None:
        return int(self.counts.shape[0]) if self.is_fitted else None

    def check_state(self) -> None:
        """Finite templates, counts >= 0 and at least one predicted class (else every score is +inf)."""
        super().check_state()
        if bool((self.counts < 0).any()) or int(self.counts.sum()) <= 0:
            raise InvalidStateError("KLMatching tensor 'counts' must be >= 0 with at least one class predicted")

    # ------------------------------------------------------------------ streaming fit
    def _begin_fit(self) -> None:
        self._sums: Tensor | None = None
        self._n: Tensor | None = None

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        logits = z[known_mask(y.reshape(-1)).to(z.device)]
        probs = logits.to(torch.float64).softmax(dim=1)
        classes = logits.shape[1]
        if self._sums is None or self._n is None:
            self._sums = torch.zeros(classes, classes, dtype=torch.float64, device=z.device)
            self._n = torch.zeros(classes, dtype=torch.int64, device=z.device)
        predicted = probs.argmax(dim=1)
        self._sums.index_add_(0, predicted, probs)
        self._n += torch.bincount(predicted, minlength=classes)

    def _fit_statistics(self) -> dict[str, Tensor]:
        """``sums`` (``C x C`` float64 posteriors per predicted class) and ``counts`` (int64); merged by
        addition."""
        if self._sums is None or self._n is None:
            return {}
        return {"sums": self._sums, "counts": self._n}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        sums, counts = stats.get("sums"), stats.get("counts")
        if set(stats) != {"sums", "counts"} or sums is None or counts is None:
            raise ValueError(f"KLMatching statistics must be 'sums' and 'counts', got {sorted(stats)}")
        classes = counts.shape[0] if counts.dim() == 1 else -1
        if sums.shape != (classes, classes) or sums.dtype != torch.float64 or counts.dtype != torch.int64:
            raise ValueError("KLMatching statistics must be float64 'sums' C x C and int64 'counts' C")
        if self._n is not None and self._n.shape[0] != classes:
            raise ValueError(f"KLMatching statistics have {classes} classes, this fit {self._n.shape[0]}")
        if bool((counts < 0).any()):
            raise ValueError("KLMatching statistics 'counts' must be >= 0")
        device = self._sums.device if self._sums is not None else self.device
        if self._sums is None or self._n is None:
            self._sums, self._n = sums.to(device, copy=True), counts.to(device, copy=True)
        else:
            self._sums += sums.to(device)
            self._n += counts.to(device)

    def _finish_fit(self) -> None:
        if self._sums is None or self._n is None or int(self._n.sum()) == 0:
            raise ValueError("KLMatching: no ID samples (labels >= 0) to fit on")
        self.templates = (self._sums / self._n.clamp(min=1).unsqueeze(1)).to(torch.float32)
        self.counts = self._n.clone()
        self._sums = self._n = None

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def score(logits: Tensor, templates: Tensor, counts: Tensor | None = None) -> Tensor:
        """``min_k KL(softmax(logits) || templates[k])`` over the classes with ``counts[k] > 0`` (all if None)."""
        log_p = logits.to(torch.float64).log_softmax(dim=1)
        log_d = templates.to(device=logits.device, dtype=torch.float64).clamp(min=_MIN_PROB).log()
        # KL(p || d_k) = sum_j p_j log p_j - sum_j p_j log d_kj, for every sample and template at once
        divergence = (log_p.exp() * log_p).sum(dim=1, keepdim=True) - log_p.exp() @ log_d.T
        if counts is not None:
            divergence = divergence.masked_fill(counts.to(logits.device).unsqueeze(0) == 0, float("inf"))
        return divergence.amin(dim=1).to(logits.dtype)

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` logits given by the model"""
        self._check_fitted()
        return self.score(self._to_device(logits), self.templates, self.counts)
