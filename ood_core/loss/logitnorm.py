"""LogitNorm (Wei et al., "Mitigating Neural Network Overconfidence with Logit Normalization", ICML 2022)."""

from __future__ import annotations

from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_reduction
from ood_core.loss.crossentropy import per_entry_cross_entropy

NORM_EPS = 1e-7  # added to the logit norm, as in the authors' implementation


def logit_norm_loss(logits: Tensor, target: Tensor, t: float = 1.0, reduction: str | None = "mean") -> Tensor:
    """Cross-entropy of the logits scaled to norm :math:`1 / \\tau` (the loss of :class:`LogitNorm`):

    .. math::
        \\mathcal{L}(x, y) = -\\log \\frac{\\exp(f_y(x) / (\\tau \\lVert f(x) \\rVert))}
        {\\sum_{i=1}^K \\exp(f_i(x) / (\\tau \\lVert f(x) \\rVert))}

    OOD entries (targets ``< 0``) get zero loss and are not counted by ``mean`` (pytorch-ood's
    ``logit_norm_loss`` drops them); a batch without ID entries gives ``0`` with a graph.

    :param logits: ``B x K`` (or ``B x K x H x W``) logits
    :param target: labels ``B`` (or ``B x H x W``)
    :param t: temperature :math:`\\tau > 0`
    :param reduction: ``mean``, ``sum`` or ``none``
    :raises ValueError: on a non-positive temperature, an unknown reduction or mismatched shapes
    """
    if t <= 0:
        raise ValueError(f"temperature t must be positive, got {t}")
    check_reduction(reduction)
    normalized = logits / (t * (logits.norm(p=2, dim=1, keepdim=True) + NORM_EPS))
    loss = per_entry_cross_entropy(normalized, target)
    known = target >= 0
    if reduction in ("mean", "sum") and not bool(known.any()):
        return logits.sum() * 0.0  # keeps ``backward()`` working on a batch of OOD samples only
    return apply_reduction(loss, reduction, known=known)


class LogitNorm(nn.Module):
    """Cross-entropy on normalized logits (:func:`logit_norm_loss`):

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
        return logit_norm_loss(logits, target, self.t, self.reduction)
