"""OpenMax: extreme-value recalibration of the logits with an explicit "unknown" class.

Bendale, Boult: "Towards Open Set Deep Networks", CVPR 2016.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import optimize
from torch import Tensor

from ood_core.api import Detector, TensorSpec, known_mask

log = logging.getLogger(__name__)

#: rows laid out per class at a time when keeping the tails (bounds the ``C x rows`` working matrix)
TAIL_CHUNK = 4096
#: libMR shifts the tail by this constant before fitting (kept, as in libMR, for comparable parameters)
TRANSLATION = 10000.0


def weibull_mle(x: np.ndarray) -> tuple[float, float]:
    r"""Maximum-likelihood shape :math:`\kappa` and scale :math:`\lambda` of a two-parameter Weibull (location 0).

    Solves the profile-likelihood equation :math:`\sum_i x_i^\kappa \ln x_i / \sum_i x_i^\kappa - 1/\kappa
    = \overline{\ln x}` (increasing in :math:`\kappa`) with ``scipy.optimize.brentq``, then
    :math:`\lambda = (\overline{x^\kappa})^{1/\kappa}`; powers are taken relative to :math:`\max x` so that
    the large shapes of a libMR-shifted tail do not overflow. Same optimum as
    ``scipy.stats.weibull_min.fit(x, floc=0)``, without its Nelder-Mead search.
    """
    u = np.log(np.asarray(x, dtype=np.float64))
    if not np.isfinite(u).all() or np.ptp(u) == 0:
        raise ValueError("need positive, finite and not all equal values")
    rel, mean_u = u - u.max(), float(u.mean())

    def profile(k: float) -> float:
        w = np.exp(k * rel)
        return float((w * u).sum() / w.sum()) - 1.0 / k - mean_u

    lo, hi = 1e-6, 1.0
    while profile(hi) <= 0:
        lo, hi = hi, hi * 10.0
        if hi > 1e15:
            raise RuntimeError("Weibull shape diverges")
    shape = float(optimize.brentq(profile, lo, hi, xtol=1e-12, rtol=1e-12, maxiter=500))
    scale = float(np.exp(u.max()) * np.mean(np.exp(shape * rel)) ** (1.0 / shape))
    return shape, scale


class OpenMax(Detector):
    r"""Outlier score = OpenMax probability of the unknown class.

    Fit (per class :math:`k`, on the ID samples the model classifies *correctly*):

    * the mean activation vector :math:`\mu_k` (the class centre, in logit space);
    * a Weibull model of the ``tailsize`` largest distances
      :math:`d_k(v) = w_e \lVert v - \mu_k \rVert_2 + (1 - w_e)\,(1 - \cos(v, \mu_k))` of those samples.
      As in libMR's ``FitHigh``, the tail is shifted by :math:`\tau_k = 10^4 - \min(\text{tail})` and a
      two-parameter Weibull (location 0) is fitted by maximum likelihood (:func:`weibull_mle`), so
      :math:`\mathrm{CDF}_k(d) = 1 - \exp(-((d + \tau_k) / \lambda_k)^{\kappa_k})`.

    The fit takes two passes over the data (:attr:`fit_passes`): the centres, then the distances to them,
    keeping only each class's ``tailsize`` largest (memory ``O(C^2 + C \cdot tailsize)``); both passes'
    statistics merge exactly across shards.

    Predict, for logits :math:`v` whose classes ranked by activation are :math:`s(1), s(2), \dots`: for the
    top :math:`\alpha` classes :math:`\omega_{s(i)} = 1 - \frac{\alpha - i + 1}{\alpha}\mathrm{CDF}_{s(i)}(d_{s(i)}(v))`
    (the authors' OSDN code; the paper prints :math:`(\alpha - i)/\alpha`), :math:`\omega = 1` for the rest;
    revised activations :math:`\hat v_j = v_j \omega_j`, :math:`\hat v_0 = \sum_j v_j (1 - \omega_j)`;
    score :math:`= \operatorname{softmax}(\hat v_0, \hat v_1, \dots, \hat v_C)_0`.

    Differences from pytorch-ood: centres use only correctly classified samples (as in the paper), and no
    libMR is needed. A class with fewer than two distinct tail distances (or a failed fit) gets no Weibull
    model (its row in ``weibull`` has tail size 0) and its CDF is taken as 1: every sample ranked there is
    fully revised.

    State: ``centers`` (``C x C``) and ``weibull`` (``C x 4``: shape :math:`\kappa`, scale :math:`\lambda`,
    shift :math:`\tau`, tail size), both float64.

    :param model: network that outputs logits (may be ``None`` for the ``*_features`` methods)
    :param tailsize: number of largest distances per class the Weibull model is fitted to
    :param alpha: number of top-ranked class activations to revise (capped at ``C``)
    :param euclid_weight: weight :math:`w_e` of the Euclidean distance; the cosine distance gets ``1 - w_e``
    """

    input_kind = "logits"
    requires_fit = True
    state_spec: ClassVar[dict[str, TensorSpec]] = {
        "centers": TensorSpec(("C", "C"), torch.float64),
        "weibull": TensorSpec(("C", 4), torch.float64),
    }

    centers: Tensor
    weibull: Tensor

    def __init__(self, model: Any = None, tailsize: int = 25, alpha: int = 10, euclid_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        if int(tailsize) < 2 or int(alpha) < 1:
            raise ValueError(f"need tailsize >= 2 and alpha >= 1, got tailsize={tailsize}, alpha={alpha}")
        if not 0.0 <= float(euclid_weight) <= 1.0:
            raise ValueError(f"euclid_weight must be in [0, 1], got {euclid_weight}")
        self.tailsize = int(tailsize)
        self.alpha = int(alpha)
        self.euclid_weight = float(euclid_weight)

    def hparams(self) -> dict[str, Any]:
        return {"tailsize": self.tailsize, "alpha": self.alpha, "euclid_weight": self.euclid_weight}

    @property
    def num_classes(self) -> int | None:
        return int(self.centers.shape[0]) if self.is_fitted else None

    # ------------------------------------------------------------------ fit: two passes
    @property
    def fit_passes(self) -> int:
        """2: the class centres (pass 0), then each class's largest distances to its centre (pass 1)."""
        return 2

    def _begin_fit(self) -> None:
        self._sums: Tensor | None = None  # pass 0: C x C float64 sums of correct logits; pass 1: C x T tails
        self._counts: Tensor | None = None  # C int64: correct samples (pass 0), valid tail entries (pass 1)

    def _correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The correctly classified ID samples (float64 logits) and their labels."""
        if z.dim() != 2:
            raise ValueError(f"OpenMax expects B x C logits, got shape {tuple(z.shape)}")
        y = y.reshape(-1).to(z.device)
        keep = known_mask(y) & (z.argmax(dim=1) == y)
        return z[keep].detach().to(torch.float64), y[keep].long()

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        v, labels = self._correct(z, y)
        classes = z.shape[1]
        if self._sums is None or self._counts is None:
            width = classes if self.fit_pass == 0 else self.tailsize
            fill = 0.0 if self.fit_pass == 0 else -math.inf
            self._sums = torch.full((classes, width), fill, dtype=torch.float64, device=z.device)
            self._counts = torch.zeros(classes, dtype=torch.int64, device=z.device)
        if self._counts.shape[0] != classes:
            raise ValueError(f"OpenMax: batch has {classes} classes, earlier batches {self._counts.shape[0]}")
        v, labels = v.to(self._sums.device), labels.to(self._sums.device)
        if self.fit_pass == 0:
            self._sums.index_add_(0, labels, v)
            self._counts += torch.bincount(labels, minlength=classes)
            return
        own = self._rowwise_distance(v, self.centers.to(v.device)[labels], self.euclid_weight)
        for rows, ks in zip(own.split(TAIL_CHUNK), labels.split(TAIL_CHUNK), strict=True):
            self._add_tail(rows, ks)

    def _add_tail(self, distances: Tensor, labels: Tensor) -> None:
        """Keep per class the ``tailsize`` largest distances seen (padding ``-inf``): the new distances are laid
        out as a ``C x m`` matrix by class, appended to the tails, and ``topk`` keeps the largest."""
        assert self._sums is not None and self._counts is not None
        classes = self._counts.shape[0]
        per_class = torch.bincount(labels, minlength=classes)
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        starts = torch.cumsum(per_class, 0) - per_class
        rank = torch.arange(labels.numel(), device=labels.device) - starts[sorted_labels]
        width = int(per_class.max()) if labels.numel() else 0
        laid = torch.full((classes, width), -math.inf, dtype=torch.float64, device=labels.device)
        laid[sorted_labels, rank] = distances[order]
        both = torch.cat([self._sums, laid], dim=1)
        self._sums = both.topk(self.tailsize, dim=1).values
        self._counts = (self._counts + per_class).clamp_max(self.tailsize)

    def _fit_statistics(self) -> dict[str, Tensor]:
        """Pass 0: ``sums`` (``C x C`` float64, correct logits per class) and ``counts``; pass 1: ``tail``
        (``C x tailsize``, each class's largest distances, zero-padded) and ``counts`` (valid entries).
        Merged by summation (pass 0) and by keeping the ``tailsize`` largest of both tails (pass 1): exact."""
        if self._sums is None or self._counts is None:
            return {}
        if self.fit_pass == 0:
            return {"sums": self._sums, "counts": self._counts}
        return {"tail": torch.where(torch.isfinite(self._sums), self._sums, 0.0), "counts": self._counts}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        key = "sums" if self.fit_pass == 0 else "tail"
        if set(stats) != {key, "counts"}:
            raise ValueError(
                f"OpenMax pass {self.fit_pass} statistics must be '{key}' and 'counts', got {sorted(stats)}"
            )
        values, counts = stats[key], stats["counts"]
        classes = counts.shape[0] if counts.dim() == 1 else -1
        width = classes if self.fit_pass == 0 else self.tailsize
        if counts.dtype != torch.int64 or classes < 1 or tuple(values.shape) != (classes, width):
            raise ValueError(f"OpenMax statistics must be '{key}' C x {width} and int64 'counts' of C")
        if bool((counts < 0).any()) or (self.fit_pass == 1 and bool((counts > self.tailsize).any())):
            raise ValueError("OpenMax statistics 'counts' out of range")
        if self._counts is not None and self._counts.shape[0] != classes:
            raise ValueError(f"OpenMax statistics have {classes} classes, this fit {self._counts.shape[0]}")
        device = self._counts.device if self._counts is not None else self.device
        values, counts = values.to(device, torch.float64), counts.to(device)
        if self.fit_pass == 0:
            self._sums = values.clone() if self._sums is None else self._sums + values
            self._counts = counts.clone() if self._counts is None else self._counts + counts
            return
        valid = torch.arange(width, device=device)[None, :] < counts[:, None]
        tail = torch.where(valid, values, -math.inf)
        if self._sums is None or self._counts is None:
            self._sums, self._counts = tail, counts.clone()
            return
        self._sums = torch.cat([self._sums, tail], dim=1).topk(self.tailsize, dim=1).values
        self._counts = (self._counts + counts).clamp_max(self.tailsize)

    def _finish_fit(self) -> None:
        if self._sums is None or self._counts is None:
            raise ValueError("OpenMax: no data to fit on")
        sums, counts = self._sums, self._counts
        classes = counts.shape[0]
        if self.fit_pass == 0:
            self.centers = sums / counts.clamp(min=1).unsqueeze(1)
            return
        weibull = torch.zeros(classes, 4, dtype=torch.float64)
        weibull[:, 1] = 1.0
        for k in range(classes):
            if counts[k] == 0:
                log.warning("OpenMax: class %d has no correctly classified sample; it gets no model", k)
                continue
            tail = sums[k, : int(counts[k])].cpu().numpy()
            weibull[k] = torch.tensor(self._fit_tail(tail), dtype=torch.float64)
        self.weibull = weibull.to(sums.device)

    def _fit_tail(self, distances: np.ndarray) -> tuple[float, float, float, float]:
        """libMR ``FitHigh``: Weibull of the ``tailsize`` largest distances, shifted so their minimum is 10^4."""
        tail = np.sort(distances)[-self.tailsize :]
        if np.unique(tail).size < 2:
            return 0.0, 1.0, 0.0, 0.0
        shift = TRANSLATION - float(tail.min())
        try:
            shape, scale = weibull_mle(tail + shift)
        except (ValueError, RuntimeError) as exc:
            log.warning("OpenMax: Weibull fit failed (%s); the class gets no model", exc)
            return 0.0, 1.0, 0.0, 0.0
        return shape, scale, shift, float(tail.size)

    # ------------------------------------------------------------------ predict
    @staticmethod
    def distance(v: Tensor, centers: Tensor, euclid_weight: float) -> Tensor:
        """``N x K`` distances ``w_e * euclidean + (1 - w_e) * cosine distance`` between rows and centres."""
        dist = euclid_weight * torch.cdist(v, centers) if euclid_weight > 0 else v.new_zeros(v.shape[0], len(centers))
        if euclid_weight < 1:
            cos = torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(centers, dim=1).T
            dist = dist + (1.0 - euclid_weight) * (1.0 - cos)
        return dist

    @staticmethod
    def _rowwise_distance(v: Tensor, centers: Tensor, euclid_weight: float) -> Tensor:
        """Distance of each row of ``v`` to the matching row of ``centers`` (same metric as :meth:`distance`)."""
        dist = euclid_weight * (v - centers).norm(dim=1)
        if euclid_weight < 1:
            cos = torch.nn.functional.cosine_similarity(v, centers, dim=1, eps=1e-12)
            dist = dist + (1.0 - euclid_weight) * (1.0 - cos)
        return dist

    @staticmethod
    def weibull_cdf(d: Tensor, params: Tensor) -> Tensor:
        """CDF of the shifted Weibull models ``params`` (``... x 4`` rows) at distances ``d``; 1 without a model."""
        shape, scale, shift, n_tail = params.unbind(dim=-1)
        x = (d + shift).clamp(min=0.0) / scale
        cdf = -torch.expm1(-x.pow(shape))
        return torch.where(n_tail > 0, cdf, torch.ones_like(cdf))

    def predict_features(self, logits: Tensor) -> Tensor:
        """:param logits: ``B x C`` logits given by the model"""
        self._check_fitted()
        v = self._to_device(logits).to(torch.float64)
        alpha = min(self.alpha, v.shape[1])
        top = v.topk(alpha, dim=1).indices  # B x alpha, by descending activation
        dist = self.distance(v, self.centers, self.euclid_weight).gather(1, top)
        cdf = self.weibull_cdf(dist, self.weibull[top])
        rank_weight = (alpha - torch.arange(alpha, dtype=v.dtype, device=v.device)) / alpha  # (alpha - i + 1)/alpha
        omega = torch.ones_like(v).scatter(1, top, 1.0 - rank_weight * cdf)
        revised = torch.cat([(v * (1.0 - omega)).sum(dim=1, keepdim=True), v * omega], dim=1)
        return revised.softmax(dim=1)[:, 0].to(logits.dtype)
