"""Training-time augmentations for OOD detection (pytorch-ood's ``pytorch_ood.augment``), over data the user
supplies (nothing is downloaded):

- :class:`PixMix` / :class:`PixMixDataset` (:mod:`ood_core.augment.pixmix`): images mixed with pictures of a mixing
  set (Hendrycks et al., CVPR 2022);
- :class:`OutlierPaste` (:mod:`ood_core.augment.pasting`): cut-out objects pasted into segmentation samples, their
  pixels labeled OOD (Chan et al., ICCV 2021); :class:`InsertCOCO` / :class:`CocoOutliers`
  (:mod:`ood_core.augment.coco`) take the objects from a local COCO copy.
"""

from ood_core.augment.coco import CLASS_EXCLUSIONS, CocoOutliers, InsertCOCO
from ood_core.augment.pasting import OutlierPaste, as_cutout
from ood_core.augment.pixmix import PixMix, PixMixDataset, add_mix, augment, beta_ab, multiply_mix

__all__ = [
    "CLASS_EXCLUSIONS",
    "CocoOutliers",
    "InsertCOCO",
    "OutlierPaste",
    "PixMix",
    "PixMixDataset",
    "add_mix",
    "as_cutout",
    "augment",
    "beta_ab",
    "multiply_mix",
]
