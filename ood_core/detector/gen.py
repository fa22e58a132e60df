"""Generalized entropy (GEN) score.

Liu, Lochman, Zach: "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection", CVPR 2023.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ood_core.api import Detector


class GEN(Detector):
    r"""Outlier score = generalized entropy of the top-:math:`M` softmax probabilities:

    .. math:: G_\gamma(x) = \sum_{j=1}^{M} p_{(j)}^\gamma \, (1 - p_{(j)})^\gamma

    where :math:`p_{(1)} \ge p_{(2)} \ge \dots` are the sorted softmax probabilities of the logits and
    :math:`\gamma \in (0, 1)`. A peaked (ID) posterior gives a small value, a flat (OOD) one a large value.
    As in the paper the terms are *summed*; pytorch-ood averages them instead, which only rescales the score
    by :math:`1/M` (same ranking). Probabilities are clamped to ``[1e-7, 1 - 1e-7]`` as in the authors' code.
    Works on ``B x C`` logits and, for segmentation, on ``B x C x H x W`` logits (scores ``B x H x W``).

    :param model: network that outputs logits (may be ``None`` for :meth:`predict_features`)
    :param gamma: exponent :math:`\gamma` (the paper recommends 0.1)
    :param M: number of largest probabilities summed over; ``None`` uses all classes
    """

    input_kind = "logits"
    supports_segmentation = True

    def __init__(self, model: Any = None, gamma: float | None = 0.1, M: int | None = None) -> None:  # noqa: N803
        super().__init__()
        self.model = model
        self.gamma = 0.1 if gamma is None else float(gamma)
        if self.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if M is not None and (isinstance(M, bool) or int(M) != M or M < 1):
            raise ValueError(f"M must be a positive integer or None, got {M}")
        self.M = None if M is None else int(M)

    def hparams(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "M": self.M}

    @staticmethod
    def score(logits: Tensor, gamma: float = 0.1, M: int | None = None) -> Tensor:  # noqa: N803
        """Sum of ``p^gamma (1 - p)^gamma`` over the ``M`` largest softmax probabilities (class axis = dim 1)."""
        p = logits.softmax(dim=1).clamp(1e-7, 1.0 - 1e-7)
        if M is not None and p.shape[1] > M:
            p = p.topk(M, dim=1).values
        return (p.pow(gamma) * (1.0 - p).pow(gamma)).sum(dim=1)

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` or ``B x C x H x W`` logits given by the model"""
        return self.score(logits, self.gamma, self.M)
