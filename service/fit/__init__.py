"""Fitting at scale, web-free: streaming data sources, the fit runner, ``ood-fit`` and torchrun (issue 9).

A fit reads its data once per pass (most detectors need one, ViM and OpenMax two) in bounded memory: images are
read member by member and decoded in DataLoader worker processes with the served model's own decoding and
preprocessing, run through its forward, and folded into the detector's mergeable statistics
(:meth:`ood_core.api.Detector.partial_fit_features`); under torchrun every rank reads its own share and the ranks'
statistics are merged (:func:`ood_core.distributed.merge_across_ranks`). A stratified, seeded share of the ID
samples (the same for any number of ranks) is held out for the calibration; ``ood/`` images are only evaluated.

Module map:

- ``__main__``: the ``ood-fit`` entry point (also ``python -m service.fit`` and ``torchrun -m service.fit``).
- :mod:`~service.fit.cli`: its arguments, the model from the config (or the demo), the atomic write by rank 0,
  exit statuses (0; 1 with one line on any error, nothing written; 2 bad arguments; 130 interrupted).
- :mod:`~service.fit.report`: the tqdm progress bar, the summary, the ``--json`` report.
- :mod:`~service.fit.sources`: :func:`~service.fit.sources.open_source` (class-folder directory, ``.zip``,
  ``.tar(.gz)``, WebDataset shards, ``.safetensors`` of precomputed outputs), the member checks
  (:class:`~service.fit.sources.SourceLimits`, :class:`~service.fit.sources.DataSourceError`), rank shares and
  the worker-process loader.
- :mod:`~service.fit.runner`: :func:`~service.fit.runner.run_fit`, :class:`~service.fit.runner.FitOptions` (built
  from a job's or ``ood-fit``'s parameters by ``FitOptions.from_parameters``), :class:`~service.fit.runner.FitResult`
  (what ``ood-fit`` and the server's fit jobs call).
- :mod:`~service.fit.grid`: a grid in ``hparams`` (``{"grid": {"k": [1, 5]}}``): every candidate fitted on one
  stream, the best by AUROC on ``ood/`` kept, every candidate reported (:class:`ood_core.search.GridSearch`'s rows).
- :mod:`~service.fit.training`: the fit passes (stream, checkpoint, merge, finish, resume).
- :mod:`~service.fit.stream`: batches through the forward, progress (:class:`~service.fit.stream.FitProgress`),
  cancellation (:class:`~service.fit.stream.FitCancelled`).
- :mod:`~service.fit.holdout`: the calibration hold-out (seeded hashes of sample keys, per-class quotas).
- :mod:`~service.fit.checkpoint`: per-rank checkpoints for ``--checkpoint-every`` / ``--resume``.
- :mod:`~service.fit.dist`: torch.distributed start-up from torchrun's environment and the error agreement that
  makes every rank fail when one does.
- :mod:`~service.fit.detectors`: :func:`~service.fit.detectors.new_detector`, a detector wired to the model.

Never imports :mod:`service.api`, :mod:`service.jobs`, the web frameworks or the app wiring (import-linter).
"""
