"""Class centers used by the center-based losses (CAC, Center, MCHAD, Deep SVDD, II)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distances ``||x_i - mu_k||^2`` of shape ``N x K`` (exact, never negative)."""
    return (x.unsqueeze(1) - centers.unsqueeze(0)).pow(2).sum(dim=-1)


class ClassCenters(nn.Module):
    """One center :math:`\\mu_k` per class, stored in :attr:`params` (``K x D``), drawn from
    :math:`\\mathcal{N}(0, I)`; learnable unless ``fixed``. Calling the module returns the squared
    Euclidean distances ``N x K`` of the inputs to the centers (as in pytorch-ood).

    :param n_classes: number of centers :math:`K`
    :param n_features: dimensionality :math:`D`
    :param fixed: if ``True`` the centers are a buffer (not trained, but saved and moved with the module)
    """

    def __init__(self, n_classes: int, n_features: int, fixed: bool = False) -> None:
        super().__init__()
        init = torch.randn(n_classes, n_features)
        self.fixed = fixed
        if fixed:
            self.register_buffer("_params", init)
        else:
            self._params = nn.Parameter(init)

    @property
    def params(self) -> Tensor:
        """The centers, ``K x D``."""
        return self._params

    @property
    def centers(self) -> Tensor:
        """Alias of :attr:`params`."""
        return self._params

    @property
    def num_classes(self) -> int:
        return int(self._params.shape[0])

    @property
    def n_features(self) -> int:
        return int(self._params.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        """:param x: ``N x D`` embeddings; :return: ``N x K`` squared distances"""
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected N x {self.n_features} inputs, got {tuple(x.shape)}")
        return squared_distances(x, self._params)

    def predict(self, x: Tensor) -> Tensor:
        """Class membership probabilities: softmin over the squared distances, ``N x K``."""
        return torch.softmax(-self(x), dim=1)


class RunningCenters(nn.Module):
    """Running class means :math:`\\mu_k` estimated online from batches (buffers, not trained).

    Unlike pytorch-ood (a cumulative average over *batches*, shared by all classes), every center is the
    exact mean of all embeddings of its class seen so far: :math:`\\mu_k \\leftarrow \\mu_k +
    (\\sum_{i: y_i = k} z_i - n_k \\mu_k) / (N_k + n_k)` with :math:`N_k` the count so far.

    :param n_classes: number of centers :math:`K`
    :param n_embedding: dimensionality :math:`D`
    """

    running_centers: Tensor
    counts: Tensor

    def __init__(self, n_classes: int, n_embedding: int) -> None:
        super().__init__()
        self.num_classes = n_classes
        self.n_embedding = n_embedding
        self.register_buffer("running_centers", torch.zeros(n_classes, n_embedding))
        self.register_buffer("counts", torch.zeros(n_classes, dtype=torch.long))

    @property
    def centers(self) -> Tensor:
        """Current estimates, ``K x D`` (zeros for classes not seen yet)."""
        return self.running_centers

    def reset(self) -> None:
        """Forget all statistics."""
        self.running_centers.zero_()
        self.counts.zero_()

    def batch_means(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-class means of a batch (differentiable) and the per-class counts.

        :param x: ``N x D`` embeddings; :param target: ``N`` labels in ``[0, K)``
        :return: means ``K x D`` (zero rows for absent classes) and counts ``K``
        """
        counts = torch.bincount(target, minlength=self.num_classes)
        sums = x.new_zeros(self.num_classes, x.shape[1]).index_add(0, target, x)
        return sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype), counts

    @torch.no_grad()
    def update(self, x: Tensor, target: Tensor) -> None:
        """Fold a batch of ID embeddings (labels ``>= 0``) into the running means."""
        counts = torch.bincount(target, minlength=self.num_classes).to(self.counts.device)
        sums = torch.zeros_like(self.running_centers).index_add(0, target, x.detach().to(self.running_centers))
        total = (self.counts + counts).clamp_min(1).unsqueeze(1).to(sums.dtype)
        self.running_centers += (sums - counts.unsqueeze(1).to(sums.dtype) * self.running_centers) / total
        self.counts += counts

    def forward(self, x: Tensor) -> Tensor:
        """Squared distances ``N x K`` of the embeddings to the running centers."""
        return squared_distances(x, self.running_centers)
