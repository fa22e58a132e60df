"""VOS with virtual outlier synthesis (Du, Wang, Cai, Li, ICLR 2022): outliers are sampled from the
low-likelihood region of class-conditional Gaussians fitted to the penultimate features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ood_core.loss._utils import apply_reduction, check_reduction, fill_masked
from ood_core.loss.crossentropy import per_entry_cross_entropy
from ood_core.loss.vos import uncertainty_loss, weighted_energy

COVARIANCE_JITTER = 1e-4  # added to the shared covariance's diagonal, as in the authors' code


class VirtualOutlierSynthesizingRegLoss(nn.Module):
    """Cross-entropy plus the VOS regularizer (see :class:`~ood_core.loss.VOSRegLoss`) on *virtual* outliers.

    A FIFO queue of the last ``sample_number`` (detached) features per class is kept in buffers. Once every
    queue is full, each forward fits Gaussians :math:`\\mathcal{N}(\\hat\\mu_k, \\hat\\Sigma)` (class means,
    shared covariance :math:`+10^{-4} I`), draws ``sample_from`` points per class and keeps the ``select``
    with the lowest likelihood (with a shared covariance, the largest Mahalanobis norm, so only norms are
    compared). Their logits ``fc(v)`` give the outlier energies; the ID energies are those of the batch.
    The regularizer :math:`R` is the mean logistic loss over ID samples and virtual outliers. Before the
    queues are full, :math:`R = 0`.

    Per ID sample the loss is :math:`\\mathrm{CE}_i + \\alpha R`; OOD samples (labels ``< 0``) are ignored
    (zero, not counted by ``mean``, not queued). So ``sum`` is :math:`\\sum_i \\mathrm{CE}_i + N \\alpha R`
    (pytorch-ood adds :math:`\\alpha R` once). Classification only (``B x C`` logits, ``B x D`` features).

    ``fc`` (the network's last layer) is *not* registered as a submodule, so its parameters are not
    listed twice when ``model.parameters()`` and ``criterion.parameters()`` are optimized together.

    :param logistic_regression: :math:`\\phi`, mapping ``N x 1`` energies to ``N x 1`` or ``N x 2``
    :param weights_energy: layer whose ``1 x C`` weight gives the energy weights
    :param device: device of the feature queue (moved by ``.to()`` like every buffer)
    :param num_classes: number of classes
    :param num_input_last_layer: feature dimensionality :math:`D` (inputs of ``fc``)
    :param fc: last layer of the network, mapping features to logits
    :param alpha: weight :math:`\\alpha` of the regularizer
    :param reduction: ``mean``, ``sum`` or ``none``
    :param sample_number: queue length per class
    :param select: virtual outliers kept per class
    :param sample_from: samples drawn per class to select from
    """

    queue: Tensor
    queue_counts: Tensor

    def __init__(
        self,
        logistic_regression: nn.Module,
        weights_energy: nn.Linear,
        device: str,
        num_classes: int,
        num_input_last_layer: int,
        fc: nn.Module,
        alpha: float = 0.1,
        reduction: str | None = "mean",
        sample_number: int = 1000,
        select: int = 1,
        sample_from: int = 10000,
    ) -> None:
        super().__init__()
        if not 0 < select <= sample_from:
            raise ValueError(f"need 0 < select <= sample_from, got select={select}, sample_from={sample_from}")
        self.logistic_regression = logistic_regression
        self.weights_energy = weights_energy
        self.device = device
        self.num_classes = num_classes
        self.num_input_last_layer = num_input_last_layer
        self._fc = (fc,)  # a tuple: not a registered submodule
        self.alpha = alpha
        self.reduction = check_reduction(reduction)
        self.sample_number = sample_number
        self.select = select
        self.sample_from = sample_from
        self.register_buffer("queue", torch.zeros(num_classes, sample_number, num_input_last_layer, device=device))
        self.register_buffer("queue_counts", torch.zeros(num_classes, dtype=torch.long, device=device))

    @property
    def fc(self) -> nn.Module:
        """The network's last layer."""
        return self._fc[0]

    @torch.no_grad()
    def _enqueue(self, features: Tensor, target: Tensor) -> None:
        features = features.detach().to(self.queue)
        for k in target.unique().tolist():
            new = features[target == k][-self.sample_number :]
            n_new, filled = new.shape[0], int(self.queue_counts[k])
            if filled + n_new <= self.sample_number:
                self.queue[k, filled : filled + n_new] = new
            else:  # FIFO: drop the oldest
                self.queue[k] = torch.cat([self.queue[k, :filled], new])[-self.sample_number :]
            self.queue_counts[k] = min(filled + n_new, self.sample_number)

    @torch.no_grad()
    def synthesize(self) -> Tensor:
        """Virtual outliers, ``(num_classes * select) x D``, from the current (full) queues."""
        means = self.queue.mean(dim=1)
        centered = (self.queue - means.unsqueeze(1)).reshape(-1, self.num_input_last_layer)
        covariance = centered.T @ centered / centered.shape[0]
        covariance += COVARIANCE_JITTER * torch.eye(self.num_input_last_layer, device=covariance.device)
        cholesky = torch.linalg.cholesky(covariance)
        noise = torch.randn(self.num_classes, self.sample_from, self.num_input_last_layer, device=means.device)
        farthest = noise.pow(2).sum(dim=2).topk(self.select, dim=1).indices  # lowest density per class
        chosen = noise.gather(1, farthest.unsqueeze(2).expand(-1, -1, self.num_input_last_layer))
        return (means.unsqueeze(1) + chosen @ cholesky.T).reshape(-1, self.num_input_last_layer)

    def forward(self, logits: Tensor, features: Tensor, y: Tensor) -> Tensor:
        """:param logits: ``B x C`` logits; :param features: ``B x D`` penultimate features; :param y: labels"""
        if logits.dim() != 2 or features.dim() != 2 or y.dim() != 1:
            raise ValueError("VirtualOutlierSynthesizingRegLoss supports classification inputs only")
        known = y >= 0
        nll = per_entry_cross_entropy(logits, y)
        self._enqueue(features[known], y[known])
        regularization = logits.sum() * 0.0
        if bool(known.any()) and bool((self.queue_counts == self.sample_number).all()):
            virtual = self.synthesize().to(features)
            energy = torch.cat(
                [
                    weighted_energy(logits[known], self.weights_energy),
                    weighted_energy(self.fc(virtual), self.weights_energy),
                ]
            )
            is_outlier = torch.arange(energy.shape[0], device=energy.device) >= int(known.sum())
            regularization = uncertainty_loss(self.logistic_regression, energy, is_outlier).mean()
        loss = nll + fill_masked((self.alpha * regularization).expand(int(known.sum())), known)
        return apply_reduction(loss, self.reduction, known=known)
