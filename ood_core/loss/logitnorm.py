"""LogitNorm (Wei et al., "Mitigating Neural Network Overconfidence with Logit Normalization", ICML 2022)."""

from __future__ import annotations

from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_reduction
from ood_core.loss.crossentropy import per_entry_cross_entropy

NORM_EPS = 1e-7  # added to the logit norm, as in the authors' implementation


class LogitNorm(nn.Module):
    """Cross-entropy on normalized logits:

    .. math::
        \\mathcal{L}(x, y) = -\\log \\frac{\\exp(f_y(x) / (\\tau \\lVert f(x) \\rVert))}
        {\\sum_{i=1}^K \\exp(f_i(x) / (\\tau \\lVert f(x) \\rVert))}

    The norm is that of the logit vector :math:`f(x)` (the seed's :math:`\\lVert x \\rVert` is a typo; the
    paper normalizes the logits), computed with :math:`+10^{-7}` for stability. Ignores OOD inputs
    (targets ``< 0``, zero loss, not counted by ``mean``). Segmentation: the norm is taken per pixel
    over the class axis.

    :param t: temperature :math:`\\tau`
    :param reduction: ``mean``, ``sum`` or ``none``
    """

    def __init__(self, t: float = 1.0, reduction: str | None = "mean") -> None:
        super().__init__()
        if t <= 0:
            raise ValueError(f"temperature t must be positive, got {t}")
        self.t = t
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """:param logits: ``B x C`` (or ``B x C x H x W``) logits; :param target: labels"""
        normalized = logits / (self.t * (logits.norm(p=2, dim=1, keepdim=True) + NORM_EPS))
        loss = per_entry_cross_entropy(normalized, target)
        return apply_reduction(loss, self.reduction, known=target >= 0)
