"""Detector states: on disk, validated against a model, installed, kept in step across replicas, fitted.

Module map:

* :mod:`~service.states.store`: :class:`StateStore`, versioned atomic files ``<state_dir>/<model>/<detector>/``
  with a cross-process lock per detector, streamed uploads under ``<state_dir>/.uploads/``, 507 on a full volume;
  :mod:`~service.states.commit` makes a write the next version (hash, rename, ``active.json``, old versions
  removed), :mod:`~service.states.locking` holds a detector's ``flock``; :mod:`~service.states.cleanup` removes
  what interrupted writes left (at start and after each write).
* :mod:`~service.states.validate`: load a safetensors state for a served model and check it (class, input kind,
  dimensions, a smoke test on the warm-up outputs) before it can replace the active one.
* :mod:`~service.states.versions`: the last ``OOD_STATE_KEEP`` versions of a detector and where each came from
  (upload, fit job, rollback), recorded in ``active.json``'s history.
* :mod:`~service.states.manager`: :class:`StateManager`, which installs (validate, store, swap in), rolls back to a
  kept version, removes and loads at start-up the detectors of a model; every change holds its write lock.
* :mod:`~service.states.sync`: the periodic compare-and-swap sync with states that other replicas wrote.
* :mod:`~service.states.fitting`: fit and calibrate a detector through the served model's own forward.

No module here imports :mod:`service.api`, FastAPI or Starlette (``make lint`` checks it).
"""
