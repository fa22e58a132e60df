"""The HTTP layer: FastAPI routes and everything that only exists because of HTTP.

Module map:

* :mod:`~service.api.routes`: one module per resource (``health``, ``models``, ``detectors``, ``versions``,
  ``fit`` and ``jobs`` (fit jobs), ``score``, ``segment``; ``v2``: the Open Inference Protocol); each scoring route is decode -> submit
  (:mod:`service.engine.submit`) -> shape. The V2 protocol's bodies: :mod:`~service.api.v2_schemas` (pydantic),
  :mod:`~service.api.v2_codec` (JSON and binary tensors on the wire), :mod:`~service.api.v2_outputs` (a model's
  inputs and outputs, results -> output tensors).
* :mod:`~service.api.bodies`: request bodies: multipart ``files`` or JSON ``instances`` -> encoded images and
  fields, within the limits; :mod:`~service.api.multipart` is the multipart parser.
* :mod:`~service.api.deps`: the route dependencies as ``Annotated`` aliases (services, model lookup, names,
  query parameters, access checks); :mod:`~service.api.auth` checks API keys.
* :mod:`~service.api.schemas`: every request parameter and response shape as pydantic models (``/openapi.json``).
* :mod:`~service.api.problems`: the ONE exception -> HTTP status table and the ``application/problem+json`` body
  (under ``/v2`` the protocol's ``{"error": ...}``).
* :mod:`~service.api.scoring_lane`: ``POST /score`` and ``/segment`` dispatched straight to their lean handlers
  (FastAPI's router skipped; the same answers).
* :mod:`~service.api.middleware`: request ids, the body-size limit and deadline, request metrics and the access
  log; :mod:`~service.api.http_protocol`: the connection limit and the request-head deadline and bounds, below
  the app (a uvicorn protocol); :mod:`~service.api.uploads`: state uploads streamed to the state volume;
  :mod:`~service.api.fit_uploads`: a fit job's body (archive spooled to the state volume, small forms in memory).
* :mod:`~service.api.job_schemas`: the job list, versions and rollback models.
* :mod:`~service.api.docs`: ``/openapi.json`` completed, and the Swagger UI / ReDoc pages with their assets served
  from the package (no CDN).
"""
