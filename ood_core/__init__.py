"""ood_core: out-of-distribution detectors, training losses and metrics in pure PyTorch.

Convention (as in pytorch-ood): detectors return outlier scores where *higher means more OOD*;
labels < 0 mark OOD samples.
"""

__version__ = "0.1.0"
