"""The embedded digits benchmark: ``python -m ood_core.benchmark`` (or ``ood-bench``).

Fits every detector of :mod:`ood_core.detector` on the ID ``train`` split of :mod:`ood_core.data` (digits 0-5),
using the zoo's classifier (:func:`ood_core.zoo.load_classifier`), and measures AUROC, AUPR-IN, AUPR-OUT and
FPR95TPR (:mod:`ood_core.metrics`; OOD is the positive class) of the ID ``test`` split against each OOD set:
near-OOD digits 6-9, Gaussian noise, uniform noise and crops of scikit-learn's sample photos. The detectors
that support segmentation are measured per pixel on 64x64 mosaics (:func:`ood_core.data.make_mosaics`) with
the zoo's segmenter, pooled over all pixels and averaged per image (mosaics with an OOD digit).

Network outputs (logits, pooled features, feature maps, per-stage outputs) are computed once per data set;
detectors consume them through ``fit_features`` / ``predict_features``. Only the detectors whose
``input_kind`` is ``"input"`` run the network themselves, through ``fit`` / ``predict``: ODIN,
MahalanobisODIN, GradNorm, GradUncertainty and NACUE on the images (they need gradients); MCD on the feature
maps before the networks' only dropout layer (the last layer of ``body``), with the dropout and everything after
it as its model: the layers before the dropout are deterministic (no batch norm), so this samples exactly the
same distribution as passing the images, at a fraction of the cost. Writes Markdown and JSON (default
``docs/benchmark-digits.{md,json}``) and prints the Markdown. The served cost per image of every detector is
measured apart, through the service (``bench/digits_served.py``, which adds it to the report).

Modules: :mod:`~ood_core.benchmark.outputs` (network outputs, fitting and scoring on them),
:mod:`~ood_core.benchmark.factories` (each detector configured for the digits networks),
:mod:`~ood_core.benchmark.runner` (the runs and the CLI), :mod:`~ood_core.benchmark.report` (Markdown).
"""

from ood_core.benchmark.factories import classifier_detector, dropout_tail, segmentation_detector
from ood_core.benchmark.outputs import Outputs, classifier_outputs, layer_taps, scores_of, segmenter_head, stages
from ood_core.benchmark.report import METRICS, render_markdown
from ood_core.benchmark.runner import DETECTORS, SEED, main, run, run_classification, run_segmentation, write_report

__all__ = [
    "DETECTORS",
    "METRICS",
    "SEED",
    "Outputs",
    "classifier_detector",
    "classifier_outputs",
    "dropout_tail",
    "layer_taps",
    "main",
    "render_markdown",
    "run",
    "run_classification",
    "run_segmentation",
    "scores_of",
    "segmentation_detector",
    "segmenter_head",
    "stages",
    "write_report",
]
