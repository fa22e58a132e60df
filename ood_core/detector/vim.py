"""Virtual-logit Matching (ViM).

Wang, Li, Zhang, Zhang: "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ood_core.api import Detector, TensorSpec, known_mask
from ood_core.detector.mahalanobis import CHUNK_ROWS


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
    features are kept during the fit (as in the paper's code); the moment (accumulated over row chunks),
    the eigendecomposition and alpha are float64. :meth:`predict_features` computes in float32 (float64 for
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

    @property
    def num_classes(self) -> int | None:
        return int(self.w.shape[0])

    def logits(self, x: Tensor) -> Tensor:
        """Logits of the last layer, ``x W^T + b``, in the features' floating dtype (float32 logits are what
        the network itself computes; only the residual norm needs float64)."""
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return x.to(dtype) @ self.w.to(dtype).T + self.b.to(dtype)

    def _fit_all(self, z: Tensor, y: Tensor) -> None:
        z = self._to_device(z.detach().flatten(1))
        z = z[known_mask(y.reshape(-1).to(z.device))]
        if z.shape[0] == 0:
            raise ValueError("no in-distribution samples (labels >= 0) to fit on")
        dim = z.shape[1]
        if dim != self.w.shape[1]:
            raise ValueError(f"features have {dim} dimensions, w expects {self.w.shape[1]}")
        if self.d >= dim:
            warnings.warn(f"d={self.d} >= feature dimension {dim}: using d={dim // 2}", stacklevel=3)
            self.d = dim // 2
        moment = z.new_zeros(dim, dim, dtype=torch.float64)
        for rows in z.split(CHUNK_ROWS):
            centred = rows.to(torch.float64) - self.u
            moment += centred.T @ centred
        _, vectors = torch.linalg.eigh((moment + moment.T) / (2 * z.shape[0]))  # ascending eigenvalues
        self.principal = vectors[:, dim - self.d :].contiguous()
        residual = torch.cat([self.residual_norm(rows) for rows in z.split(CHUNK_ROWS)])
        max_logit = self.logits(z).max(1).values.to(torch.float64)
        self.alpha = (max_logit.mean() / residual.mean()).reshape(1)

    def residual_norm(self, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        r""":math:`\lVert x^{P^\perp}\rVert = \lVert (x-u) - P P^\top (x-u) \rVert`, computed in ``dtype``.

        Two GEMMs with the ``d`` principal columns instead of one with the ``D - d`` residual ones. The residual
        vector is formed directly (no difference of squared norms), so its rounding error is about
        ``eps · ||x - u||`` and does not blow up when the residual is small."""
        centred = x.to(dtype) - self.u.to(dtype)
        principal = self.principal.to(dtype)
        return (centred - (centred @ principal) @ principal.T).norm(dim=1)

    def predict_features(self, x: Tensor) -> Tensor:
        """:param x: ``B x D`` features; returns ``B`` scores"""
        self._check_fitted()
        z = self._to_device(x.detach().flatten(1))
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        virtual = self.alpha.to(dtype) * self.residual_norm(z, dtype)
        energy = torch.logsumexp(self.logits(z.to(dtype)), dim=1)
        return (virtual - energy).to(x.dtype if x.is_floating_point() else torch.float32)
