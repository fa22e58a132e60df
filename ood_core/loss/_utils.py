"""Shared helpers of the loss modules: OOD masks, reductions and the segmentation layout.

Conventions used by every loss in :mod:`ood_core.loss`:

- A target ``< 0`` marks an OOD sample (or pixel).
- *Unsupervised* losses compute per-sample values only for ID entries; OOD entries get exactly ``0``
  (and no gradient). ``reduction="mean"`` then averages over the ID entries only, so adding OOD samples to
  a batch does not change the loss; ``"none"`` keeps the shape of the targets.
- *Supervised* losses have a term for every entry; ``"mean"`` averages over all entries.
- Segmentation: ``B x C x H x W`` inputs with ``B x H x W`` targets are handled by moving the channel axis
  last and treating every pixel as a sample (:func:`flatten_dense`).
"""

from __future__ import annotations

from torch import Tensor

_REDUCTIONS = (None, "none", "mean", "sum")


def check_reduction(reduction: str | None) -> str | None:
    """Validate a ``reduction`` argument (``None`` means ``"none"``, as in pytorch-ood)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none' or None, got {reduction!r}")
    return reduction


def is_known(target: Tensor) -> Tensor:
    """Boolean mask of in-distribution entries (``target >= 0``)."""
    return target >= 0


def apply_reduction(loss: Tensor, reduction: str | None, known: Tensor | None = None) -> Tensor:
    """Reduce a per-entry loss.

    :param loss: per-entry loss values (OOD entries already zero where ``known`` is given)
    :param reduction: ``"mean"``, ``"sum"``, ``"none"`` or ``None``
    :param known: optional mask of the entries that count for ``"mean"`` (unsupervised losses pass the ID
        mask); without it, the mean is over all entries. An empty selection gives ``0`` (with a graph).
    """
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        if known is None:
            return loss.sum() / max(loss.numel(), 1)
        return loss.sum() / known.sum().clamp_min(1).to(loss.dtype)  # a tensor: no host sync on GPU
    if reduction in (None, "none"):
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def flatten_dense(x: Tensor) -> Tensor:
    """``B x C`` stays as is; ``B x C x d1 x ... x dk`` becomes ``(B * d1 * ... * dk) x C`` (channel last)."""
    if x.dim() == 2:
        return x
    if x.dim() < 2:
        raise ValueError(f"expected at least 2 dimensions (B x C ...), got shape {tuple(x.shape)}")
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def check_dense_pair(x: Tensor, target: Tensor, name: str = "logits") -> None:
    """Check that ``x`` is ``B x C x *S`` and ``target`` is ``B x *S``."""
    if x.dim() != target.dim() + 1 or x.shape[0] != target.shape[0] or x.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} do not match targets of shape {tuple(target.shape)}: "
            f"expected {name} B x C (x H x W) and targets B (x H x W)"
        )


def fill_masked(values: Tensor, mask: Tensor) -> Tensor:
    """Tensor of ``mask``'s shape holding ``values`` (one per ``True`` entry, in order) and zeros elsewhere.

    The zeros carry no gradient, so whatever an unselected entry contains cannot leak into the loss.
    """
    out = values.new_zeros(mask.shape)
    return out.masked_scatter(mask, values) if values.numel() else out
