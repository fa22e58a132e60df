"""The calls the seed documents (the pytorch-ood detector reference and overview in ``/work/shared/seeds``), run
as written there, importing from ``ood_core`` instead of ``pytorch_ood``.

One test per detector the seed documents: its constructor with the documented arguments (by keyword, as the
signature lists them), ``fit(loader[, device])``, ``detector(x)``, the feature interface
(``Detector(model=None)``, ``fit_features``, ``predict_features``) and the documented static helpers; plus the
code examples (WeightedEBO, ASH, ReAct, the overview's EBO + OODMetrics loop). The seed's pretrained
``WideResNet`` is replaced by a small network with the same method names (no weights are downloaded). Each test
also checks what the seed says the call returns: one score per input, the same scores through either interface,
the documented formula where it is stated.
"""
