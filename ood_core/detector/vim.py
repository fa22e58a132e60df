"""Virtual-logit Matching (ViM).

Wang, Li, Zhang, Zhang: "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError, TensorSpec, known_mask, model_or_encoder, required
from ood_core.gaussian import CHUNK_ROWS
from ood_core.utils import add_gram, symmetric_from_upper

#: largest deviation of ``principalᵀ principal`` from the identity accepted by :meth:`ViM.check_state`
ORTHONORMAL_TOLERANCE = 1e-6


class ViM(Detector):
    r"""Outlier score = virtual logit minus the energy of the real logits (Wang et al. 2022, Eq. 5-6):

    .. math:: s(x) = \alpha \lVert x^{P^\perp} \rVert - \log \sum_{i=1}^{C} e^{l_i(x)}, \qquad l = W x + b

    Features are taken relative to the origin :math:`u = -W^{+} b` (:math:`W^+` the pseudo-inverse, so that
    :math:`u` maps to zero logits where possible); :math:`P` is spanned by the ``d`` leading eigenvectors of
    the uncentred second moment :math:`\frac1N \sum_i (x_i-u)(x_i-u)^\top` of the ID features (the official
    code's ``EmpiricalCovariance(assume_centered=True)``), and :math:`x^{P^\perp}` is the residual of
    :math:`x - u` outside it. :math:`\alpha = \overline{\max_i l_i(x)} / \overline{\lVert x^{P^\perp}\rVert}`
    over the fit data. The paper scores the softmax probability :math:`p_0` of the virtual logit
    :math:`\alpha\lVert x^{P^\perp}\rVert` appended to the logits; :math:`s = \log \frac{p_0}{1 - p_0}`
    is exactly its log-odds (same ranking, no saturation near 0 or 1) and the official implementation's score
    with the sign flipped so that higher is more OOD.

    Fit: two passes over the data (:attr:`fit_passes`), in memory ``O(D^2)`` whatever the data size. Pass 0
    accumulates the moment in float64 over row chunks, each chunk's product in the features' dtype (float32
    GEMM, or float64 for float64 features), and takes the eigendecomposition (float64); pass 1 needs the
    principal subspace for the residual norms and sums them and the maximum logits (in the features'
    dtype, summed in float64) for alpha. Both passes' statistics are sums, merged across shards by addition. :meth:`predict_features` computes in float32 (float64 for
    float64 input), like the network's own logits. State: ``w``, ``b`` (float32, the constructor's), ``u``,
    ``principal`` (the ``d`` orthonormal principal directions, ``D x d``) and ``alpha`` (float64).
    Labels < 0 are ignored.

    :param model: network that outputs features (may be ``None`` for ``*_features`` methods)
    :param d: dimension of the principal subspace (reduced to ``D // 2`` with a warning if ``d >= D``)
    :param w: weights of the last layer, ``C x D``
    :param b: biases of the last layer, ``C``
    :param encoder: pytorch-ood 0.4's name for ``model`` (give one of them); ``d``, ``w`` and ``b`` are
        required either way
    """

    state_spec = {
        "w": TensorSpec(("C", "D"), torch.float32),
        "b": TensorSpec(("C",), torch.float32),
        "u": TensorSpec(("D",), torch.float64),
        "principal": TensorSpec(("D", "P"), torch.float64),
        "alpha": TensorSpec((1,), torch.float64),
    }
    requires_fit = True
    input_kind = "features"

    def __init__(
        self,
        model: Any = None,
        d: int | None = None,
        w: Tensor | None = None,
        b: Tensor | None = None,
        *,
        encoder: Any = None,
    ) -> None:
        super().__init__()
        self.model = model_or_encoder(model, encoder, "ViM")
        required("ViM", d=d, w=w, b=b)
        assert d is not None
        self.d = int(d)
        if self.d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        w, b = torch.as_tensor(w).detach(), torch.as_tensor(b).detach()
        if w.dim() != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"w must be C x D and b of size C, got {tuple(w.shape)} and {tuple(b.shape)}")
        self.w, self.b = w.to(torch.float32).clone(), b.to(torch.float32).clone()
        self.u = -(torch.linalg.pinv(self.w.to(torch.float64)) @ self.b.to(torch.float64))
        self._work_cache: tuple[Tensor, Tensor, tuple[int, int, torch.dtype], Tensor, Tensor] | None = None

    def hparams(self) -> dict[str, Any]:
        return {"d": self.d}

    @classmethod
    def from_state(cls, hparams: dict[str, Any], tensors: dict[str, Tensor], modules: dict[str, Any]) -> ViM:
        detector = cls(**modules, **hparams, w=tensors["w"], b=tensors["b"])
        if "principal" in tensors and tensors["principal"].shape[1] != detector.d:
            raise ValueError(f"principal has {tensors['principal'].shape[1]} columns, expected d = {detector.d}")
        return detector

    @property
    def feature_dim(self) -> int | None:
        return int(self.w.shape[1])

    def check_state(self) -> None:
        """Finite tensors and orthonormal ``principal`` columns (the residual norm assumes them)."""
        super().check_state()
        principal = self.principal.detach().to(torch.float64)
        gram = principal.T @ principal
        error = float((gram - torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)).abs().max())
        if error > ORTHONORMAL_TOLERANCE:
            raise InvalidStateError(f"ViM tensor 'principal' must have orthonormal columns (off by {error:.3g})")

    @property
    def num_classes(self) -> int | None:
        return int(self.w.shape[0])

    def logits(self, x: Tensor) -> Tensor:
        """Logits of the last layer, ``x W^T + b``, in the features' floating dtype (float32 logits are what
        the network itself computes; only the residual norm needs float64)."""
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return x.to(dtype) @ self.w.to(dtype).T + self.b.to(dtype)

    # ------------------------------------------------------------------ fit: two passes
    @property
    def fit_passes(self) -> int:
        """2: the principal subspace (pass 0), then alpha from the residual norms (pass 1)."""
        return 2

    def _begin_fit(self) -> None:
        self._count = torch.zeros((), dtype=torch.int64)
        self._sums: dict[str, Tensor] = {}

    def _fit_batch(self, z: Tensor, y: Tensor) -> None:
        z = self._to_device(z.detach().flatten(1))
        known = known_mask(y.reshape(-1).to(z.device))
        z = z if bool(known.all()) else z[known]
        if z.shape[1] != self.w.shape[1]:
            raise ValueError(f"features have {z.shape[1]} dimensions, w expects {self.w.shape[1]}")
        if z.shape[0] == 0:
            return
        work = torch.float64 if z.dtype == torch.float64 else torch.float32
        self._count += z.shape[0]
        if self.fit_pass == 0:
            self._add(moment=self._moment_about_u(z, work))
        else:
            residual = torch.cat([self.residual_norm(rows, work) for rows in z.split(CHUNK_ROWS)])
            max_logit = self.logits(z).max(1).values
            self._add(residual_sum=residual.sum(dtype=torch.float64), logit_sum=max_logit.sum(dtype=torch.float64))

    def _add(self, **parts: Tensor) -> None:
        for name, part in parts.items():
            self._sums[name] = part if name not in self._sums else self._sums[name] + part.to(self._sums[name].device)

    def _moment_about_u(self, z: Tensor, work: torch.dtype) -> Tensor:
        r""":math:`\sum_i (x_i-u)(x_i-u)^\top` of one batch in float64 (upper triangle exact, see the class
        docstring): rows shifted by ``u`` rounded to ``work``, and the rounding corrected exactly,
        :math:`\sum (s-e)(s-e)^\top = \sum s s^\top - e t^\top - t e^\top + n e e^\top` with
        :math:`s = x - \tilde u`, :math:`e = u - \tilde u`, :math:`t = \sum s`."""
        dim = z.shape[1]
        origin = self.u.to(z.device).to(work)
        moment = z.new_zeros(dim, dim, dtype=torch.float64)
        total = z.new_zeros(dim, dtype=torch.float64)
        for rows in z.split(CHUNK_ROWS):
            shifted = rows.to(work) - origin
            add_gram(moment, shifted)
            total += shifted.sum(0).to(torch.float64)
        error = self.u.to(z.device) - origin.to(torch.float64)
        if bool((error != 0).any()):
            moment -= torch.outer(error, total) + torch.outer(total, error)
            moment += z.shape[0] * torch.outer(error, error)
        return moment

    def _fit_statistics(self) -> dict[str, Tensor]:
        """Pass 0: ``count`` and ``moment`` (the second moment about ``u``, float64, summed); pass 1:
        ``count``, ``residual_sum`` and ``logit_sum`` (float64). Shards merge by summation (one origin)."""
        return {"count": self._count, **self._sums} if int(self._count) else {}

    def _merge_fit_statistics(self, stats: dict[str, Tensor]) -> None:
        if not stats:
            return
        names = {"count", "moment"} if self.fit_pass == 0 else {"count", "residual_sum", "logit_sum"}
        if set(stats) != names:
            raise ValueError(f"ViM pass {self.fit_pass} statistics must be {sorted(names)}, got {sorted(stats)}")
        dim = int(self.w.shape[1])
        shapes = {"count": (), "moment": (dim, dim), "residual_sum": (), "logit_sum": ()}
        for name, t in stats.items():
            want_dtype = torch.int64 if name == "count" else torch.float64
            if tuple(t.shape) != shapes[name] or t.dtype != want_dtype:
                raise ValueError(f"ViM statistics '{name}' must be {want_dtype} of shape {shapes[name]}")
        if int(stats["count"]) < 0:
            raise ValueError("ViM statistics 'count' must be >= 0")
        self._count = self._count + stats["count"].cpu()
        self._add(**{k: t.to(self.device) for k, t in stats.items() if k != "count"})

    def _finish_fit(self) -> None:
        n = int(self._count)
        if n == 0:
            raise ValueError("no in-distribution samples (labels >= 0) to fit on")
        if self.fit_pass == 0:
            dim = int(self.w.shape[1])
            if self.d >= dim:
                warnings.warn(f"d={self.d} >= feature dimension {dim}: using d={dim // 2}", stacklevel=3)
                self.d = dim // 2
            moment = symmetric_from_upper(self._sums["moment"])
            _, vectors = torch.linalg.eigh((moment + moment.T) / (2 * n))  # ascending eigenvalues
            self.principal = vectors[:, dim - self.d :].contiguous()
        else:
            self.alpha = (self._sums["logit_sum"] / self._sums["residual_sum"]).reshape(1).to(torch.float64)

    def _work_tensors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``u`` and ``principal`` in ``dtype``, cached (keyed on the tensors themselves and their in-place
        version counters) so that predicting converts nothing per call."""
        u, principal, cache = self.u, self.principal, self._work_cache
        versions = (u._version, principal._version, dtype)
        if cache is None or cache[0] is not u or cache[1] is not principal or cache[2] != versions:
            cache = self._work_cache = (u, principal, versions, u.to(dtype), principal.to(dtype))
        return cache[3], cache[4]

    def residual_norm(self, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        r""":math:`\lVert x^{P^\perp}\rVert = \lVert (x-u) - P P^\top (x-u) \rVert`, computed in ``dtype``.

        Two GEMMs with the ``d`` principal columns instead of one with the ``D - d`` residual ones. The residual
        vector is formed directly (no difference of squared norms), so its rounding error is about
        ``eps · ||x - u||`` and does not blow up when the residual is small."""
        u, principal = self._work_tensors(dtype)
        centred = x.to(dtype) - u
        return torch.addmm(centred, centred @ principal, principal.T, alpha=-1.0).norm(dim=1)

    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` features; returns ``B`` scores"""
        self._check_fitted()
        z = self._to_device(x.detach().flatten(1))
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        virtual = self.alpha.to(dtype) * self.residual_norm(z, dtype)
        energy = torch.logsumexp(self.logits(z.to(dtype)), dim=1)
        return (virtual - energy).to(x.dtype if x.is_floating_point() else torch.float32)
