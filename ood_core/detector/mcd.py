"""Monte Carlo dropout (MCD): dropout kept active at test time, predictions averaged over samples.

Gal, Ghahramani: "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep Learning",
ICML 2016; variance score as in Kendall, Badrinarayanan, Cipolla: "Bayesian SegNet", BMVC 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ood_core.api import Detector
from ood_core.errors import ModelNotSetException

Network = nn.Module | Callable[[Tensor], Tensor]
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextmanager
def _stochastic_mode(model: Network, batch_norm: bool) -> Iterator[None]:
    """Put ``model`` in training mode (dropout active), batch-norm layers in eval mode when ``batch_norm``;
    restore every submodule's own ``training`` flag afterwards. A plain function is left as it is."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = {m: m.training for m in model.modules()}
    try:
        model.train()
        if batch_norm:
            for m in model.modules():
                if isinstance(m, _NORM_LAYERS):
                    m.eval()
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


class MCD(Detector):
    r"""Monte Carlo dropout: :math:`N` stochastic forward passes with dropout active.

    ``mode="mean"``: outlier score :math:`-\max_y \frac{1}{N} \sum_n \sigma_y(f_n(x))`.
    ``mode="var"``: outlier score :math:`\frac{1}{C} \sum_y \frac{1}{N - 1} \sum_n (\sigma_y(f_n(x)) - \mu_y)^2`,
    the class-averaged variance of the softmax outputs, :math:`\mu_y` their mean over the passes. The variance
    is the unbiased one (:math:`1/(N-1)`), as ``torch.var`` in pytorch-ood's code; its documentation prints
    :math:`1/N`, which only rescales the score by :math:`(N-1)/N` (same ranking, same metrics).

    The network runs in training mode during the passes, except batch-norm layers when ``batch_norm`` is true
    (so their running statistics are neither used nor updated); afterwards every submodule gets back its own
    mode (pytorch-ood instead leaves the whole model in eval mode). Needs the network in the loop:
    :meth:`predict_features` raises :class:`~ood_core.errors.FeaturesNotSupportedError`. For segmentation models
    (``B x C x H x W`` logits) the scores are ``B x H x W``. Needs no fitting; the state is the hyperparameters.

    :param model: network with dropout layers, outputs logits
    :param samples: number :math:`N` of passes
    :param mode: ``"var"`` or ``"mean"``
    :param batch_norm: keep batch-norm layers in evaluation mode during the passes
    """

    input_kind = "input"
    supports_segmentation = True

    def __init__(self, model: Any = None, samples: int = 30, mode: str = "var", batch_norm: bool = True) -> None:
        super().__init__()
        if mode not in ("var", "mean"):
            raise ValueError(f"mode must be 'var' or 'mean', got {mode!r}")
        if int(samples) < 1 or (mode == "var" and int(samples) < 2):
            raise ValueError(f"samples must be >= 1 (>= 2 for mode='var'), got {samples}")
        self.model = model
        self.n_samples = int(samples)  #: number :math:`N` of passes
        self.mode = mode
        self.batch_norm = bool(batch_norm)

    def hparams(self) -> dict[str, Any]:
        return {"samples": self.n_samples, "mode": self.mode, "batch_norm": self.batch_norm}

    @staticmethod
    @torch.no_grad()
    def run(model: Network | None, x: Tensor, samples: int, batch_norm: bool = True) -> tuple[Tensor, Tensor]:
        """``samples`` stochastic passes; returns the maximum over classes of the mean softmax output and the
        class-averaged unbiased variance of the softmax outputs (both ``B`` or ``B x H x W``), as pytorch-ood's
        code does (its documentation only says "mean and variance"). Uses Welford's running update, so memory
        does not grow with ``samples``."""
        if model is None:
            raise ModelNotSetException("MCD.run needs a model")
        mean: Tensor | None = None
        m2: Tensor | None = None
        with _stochastic_mode(model, batch_norm):
            for n in range(1, samples + 1):
                p = model(x).softmax(dim=1)
                if mean is None or m2 is None:
                    mean, m2 = p.clone(), torch.zeros_like(p)
                    continue
                delta = p - mean
                mean += delta / n
                m2 += delta * (p - mean)
        if mean is None or m2 is None:
            raise ValueError("samples must be >= 1")
        var = m2 / (samples - 1) if samples > 1 else torch.zeros_like(m2)
        return mean.amax(dim=1), var.mean(dim=1)

    @staticmethod
    @torch.no_grad()
    def run_mean(model: Network | None, x: Tensor, samples: int, batch_norm: bool = True) -> Tensor:
        """Mean softmax output over ``samples`` stochastic passes (``B x C`` or ``B x C x H x W``)."""
        if model is None:
            raise ModelNotSetException("MCD.run_mean needs a model")
        total: Tensor | None = None
        with _stochastic_mode(model, batch_norm):
            for _ in range(samples):
                p = model(x).softmax(dim=1)
                total = p if total is None else total + p
        if total is None:
            raise ValueError("samples must be >= 1")
        return total / samples

    def predict(self, x: Tensor) -> Tensor:
        """:param x: inputs, passed through the model ``samples`` times"""
        model = self._require("model")
        if self.mode == "var":
            return self.run(model, x, self.n_samples, self.batch_norm)[1]
        return -self.run_mean(model, x, self.n_samples, self.batch_norm).amax(dim=1)
