"""Training objectives for OOD detection, API-compatible with ``pytorch_ood.loss``.

All losses are ``torch.nn.Module``s. Targets ``< 0`` mark OOD samples. *Unsupervised* losses
(:class:`DeepSVDDLoss`, :class:`CACLoss`, :class:`IILoss`, :class:`CenterLoss`, :class:`CrossEntropyLoss`,
:class:`ConfidenceLoss`, :class:`LogitNorm`, :class:`VirtualOutlierSynthesizingRegLoss`) ignore OOD samples:
they get zero loss and ``reduction="mean"`` averages over ID samples only. *Supervised* losses
(:class:`OutlierExposureLoss`, :class:`EntropicOpenSetLoss`, :class:`ObjectosphereLoss`,
:class:`EnergyRegularizedLoss`, :class:`VOSRegLoss`, :class:`MCHADLoss`, :class:`BackgroundClassLoss`,
:class:`EnergyMarginLoss`, :class:`DeepSADLoss`) use them; the ``mean`` of :class:`EnergyRegularizedLoss` averages
its ID and its OOD terms each over their own samples, as the paper's expectations do.
:func:`logit_norm_loss` is the functional form of :class:`LogitNorm`.

Segmentation (``B x C x H x W`` logits or features with ``B x H x W`` targets) is supported by
:class:`CrossEntropyLoss`, :class:`LogitNorm`, :class:`ConfidenceLoss`, :class:`DeepSVDDLoss`,
:class:`OutlierExposureLoss`, :class:`EntropicOpenSetLoss`, :class:`ObjectosphereLoss`,
:class:`EnergyRegularizedLoss`, :class:`VOSRegLoss`, :class:`BackgroundClassLoss` and :class:`DeepSADLoss`.
"""

from ood_core.loss.background import BackgroundClassLoss
from ood_core.loss.cac import CACLoss
from ood_core.loss.center import CenterLoss
from ood_core.loss.centers import ClassCenters, RunningCenters
from ood_core.loss.conf import ConfidenceLoss
from ood_core.loss.crossentropy import CrossEntropyLoss
from ood_core.loss.deepsad import DeepSADLoss
from ood_core.loss.energy import EnergyRegularizedLoss
from ood_core.loss.entropy import EntropicOpenSetLoss, ObjectosphereLoss
from ood_core.loss.ii import IILoss
from ood_core.loss.logitnorm import LogitNorm, logit_norm_loss
from ood_core.loss.mchad import MCHADLoss
from ood_core.loss.oe import OutlierExposureLoss
from ood_core.loss.scone import EnergyMarginLoss
from ood_core.loss.svdd import DeepSVDDLoss
from ood_core.loss.vos import VOSRegLoss
from ood_core.loss.vos_synth import VirtualOutlierSynthesizingRegLoss

__all__ = [
    "BackgroundClassLoss",
    "CACLoss",
    "CenterLoss",
    "ClassCenters",
    "ConfidenceLoss",
    "CrossEntropyLoss",
    "DeepSADLoss",
    "DeepSVDDLoss",
    "EnergyMarginLoss",
    "EnergyRegularizedLoss",
    "EntropicOpenSetLoss",
    "IILoss",
    "LogitNorm",
    "MCHADLoss",
    "ObjectosphereLoss",
    "OutlierExposureLoss",
    "RunningCenters",
    "VOSRegLoss",
    "VirtualOutlierSynthesizingRegLoss",
    "logit_norm_loss",
]
