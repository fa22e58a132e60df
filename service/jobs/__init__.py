"""Fit jobs on the server, web-free: records, queue and scheduling, progress events, restart recovery (issue 10).

Module map:

* :mod:`~service.jobs.records`: :class:`Job` (also the HTTP answer), :class:`JobRecord`, :class:`FitParameters`,
  :class:`JobResult`; the states ``queued``, ``running``, ``done``, ``failed``, ``cancelled``.
* :mod:`~service.jobs.journal`: :class:`JobJournal`, the records (``<state_dir>/.jobs/<id>.json``, atomic), the
  spools of uploaded data, the owner locks, and the recovery after a restart ("interrupted by a restart").
* :mod:`~service.jobs.manager`: :class:`JobManager`: one running job per model, a bounded queue (429), cancel,
  listing, shutdown; :mod:`~service.jobs.running`: the job thread (``run_fit``, progress, the install of a finished
  job's state through ``StateManager.install``, metrics, the end of every job).
* :mod:`~service.jobs.forward`: :class:`ScoringFirstForward`, the job's forwards between the model's scoring
  batches.
* :mod:`~service.jobs.data`: where a job's data is (spool, ``OOD_FIT_DATA_ROOT``, images as a WebDataset shard) and
  how :func:`service.fit.sources.open_source` opens it; upload kinds by their first bytes; paths kept under the root.
* :mod:`~service.jobs.events`: :class:`JobEvents`, a job's event history for its Server-Sent Events stream.
* :mod:`~service.jobs.errors`: the jobs' exceptions (404 unknown job, 409 ended, 429 queue full, 503 closing).

The HTTP side is :mod:`service.api.routes.fit` (start), :mod:`service.api.routes.jobs` (list, read, cancel,
events), :mod:`service.api.fit_uploads` (streaming the body) and :mod:`service.api.routes.versions`.
"""
