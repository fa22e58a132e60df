"""ood-serve: the OOD scoring service.

Module map (each sub-package's ``__init__`` has its own):

* :mod:`service.api`: HTTP only: FastAPI routes, request bodies, dependencies, auth, the error table,
  middleware, response schemas and the docs pages.
* :mod:`service.engine`: everything that runs a model, web-free: model building, preprocessing, the served model,
  the batcher, per-batch scoring and verdicts, and :mod:`service.engine.submit`, the request path's entry point.
* :mod:`service.console`: the web console's static files (served at ``/`` by ``api.routes.console``).
* :mod:`service.states`: detector states: the on-disk store, validation against a model, installs, replica sync,
  fitting.
* Top level: :mod:`~service.app` (the app factory and lifespan), :mod:`~service.settings` (pydantic-settings,
  ``OOD_`` prefix; its parts :mod:`~service.model_config`, a served network's config, :mod:`~service.names`, the
  model and detector name rule, and :mod:`~service.config_file`, the YAML/JSON file), :mod:`~service.context`
  (start-up and shutdown), :mod:`~service.demo` (the embedded digits
  demo), :mod:`~service.errors` (the exceptions every layer raises), :mod:`~service.metrics` (Prometheus),
  :mod:`~service.logs` (JSON logs), ``__main__`` (the ``ood-serve`` command).

One ``/score`` request: ``api.middleware`` -> ``api.deps`` (model lookup in ``engine.catalog``) ->
``api.routes.score`` -> ``api.bodies`` -> ``engine.submit`` (``engine.decode``, ``engine.preprocess``) ->
``engine.batcher`` -> ``engine.scoring`` (``engine.served_model`` forward, ``engine.verdicts``,
``service.metrics``) -> back to ``api.routes.score``, which assembles the answer. ``make lint`` checks the
layering with import-linter: engine and states never import api, FastAPI or Starlette; engine never imports
states; ood_core never imports service.
"""
