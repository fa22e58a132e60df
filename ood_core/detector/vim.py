"""Virtual-logit Matching (ViM).

Wang, Li, Zhang, Zhang: "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, InvalidStateError, TensorSpec, known_mask
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

    Fit: ``alpha`` needs the residual norms, i.e. a second pass after the eigendecomposition, so the ID
    features are kept during the fit (as in the paper's code). The moment is accumulated in float64 over row
    chunks, each chunk's product in the features' dtype (float32 GEMM, or float64 for float64 features);
    the eigendecomposition is float64; the residual norms and logits for alpha are in the features' dtype,
    summed in float64. :meth:`predict_features` computes in float32 (float64 for
    float64 input), like the network's own logits. State: ``w``, ``b`` (float32, the constructor's), ``u``,
    ``principal`` (the ``d`` orthonormal principal directions, ``D x d``) and ``alpha`` (float64).
    Labels < 0 are ignored.

    :param model: network that outputs features (may be ``None`` for ``*_features`` methods)
    :param d: dimension of the principal subspace (reduced to ``D // 2`` with a warning if ``d >= D``)
    :param w: weights of the last layer, ``C x D``
    :param b: biases of the last layer, ``C``
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

    def __init__(self, model: Any, d: int, w: Tensor, b: Tensor) -> None:
        super().__init__()
        self.model = model
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
        if tensors["principal"].shape[1] != detector.d:
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

    def _finish_fit(self) -> None:
        if len(self._fit_buffer) == 1 and isinstance(self._fit_buffer[0][0], Tensor):  # no copy for one batch
            (z, y), self._fit_buffer = self._fit_buffer[0], []
            self._fit_all(z, y)
        else:
            super()._finish_fit()

    def _fit_all(self, z: Tensor, y: Tensor) -> None:
        z = self._to_device(z.detach().flatten(1))
        known = known_mask(y.reshape(-1).to(z.device))
        z = z if bool(known.all()) else z[known]
        if z.shape[0] == 0:
            raise ValueError("no in-distribution samples (labels >= 0) to fit on")
        dim = z.shape[1]
        if dim != self.w.shape[1]:
            raise ValueError(f"features have {dim} dimensions, w expects {self.w.shape[1]}")
        if self.d >= dim:
            warnings.warn(f"d={self.d} >= feature dimension {dim}: using d={dim // 2}", stacklevel=3)
            self.d = dim // 2
        work = torch.float64 if z.dtype == torch.float64 else torch.float32
        origin = self.u.to(work)  # u rounded to the working dtype; the rounding is corrected exactly below
        moment = z.new_zeros(dim, dim, dtype=torch.float64)
        total = z.new_zeros(dim, dtype=torch.float64)
        for rows in z.split(CHUNK_ROWS):
            shifted = rows.to(work) - origin
            add_gram(moment, shifted)
            total += shifted.sum(0).to(torch.float64)  # only enters the (tiny) correction for rounding u
        # sum (x-u)(x-u)^T = sum (s-e)(s-e)^T with s = x - origin, e = u - origin (exact float64 algebra)
        error = self.u - origin.to(torch.float64)
        moment = symmetric_from_upper(moment) - torch.outer(error, total) - torch.outer(total, error)
        moment += z.shape[0] * torch.outer(error, error)
        _, vectors = torch.linalg.eigh((moment + moment.T) / (2 * z.shape[0]))  # ascending eigenvalues
        self.principal = vectors[:, dim - self.d :].contiguous()
        residual = torch.cat([self.residual_norm(rows, work) for rows in z.split(CHUNK_ROWS)])
        max_logit = self.logits(z).max(1).values
        self.alpha = (max_logit.sum(dtype=torch.float64) / residual.sum(dtype=torch.float64)).reshape(1)

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
