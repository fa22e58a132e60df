"""The HTTP layer: FastAPI routes and everything that only exists because of HTTP.

Module map:

* :mod:`~service.api.routes`: one module per resource (``health``, ``models``, ``detectors``, ``fit``, ``score``,
  ``segment``); each scoring route is decode -> submit (:mod:`service.engine.submit`) -> shape.
* :mod:`~service.api.bodies`: request bodies: multipart ``files`` or JSON ``instances`` -> encoded images and
  fields, within the limits; :mod:`~service.api.multipart` is the multipart parser.
* :mod:`~service.api.deps`: the route dependencies as ``Annotated`` aliases (services, model lookup, names,
  query parameters, access checks); :mod:`~service.api.auth` checks API keys.
* :mod:`~service.api.schemas`: every request parameter and response shape as pydantic models (``/openapi.json``).
* :mod:`~service.api.problems`: the ONE exception -> HTTP status table and the ``application/problem+json`` body.
* :mod:`~service.api.middleware`: request ids, the body-size limit and deadline, request metrics and the access
  log; :mod:`~service.api.http_protocol`: the connection limit and the request-head deadline and bounds, below
  the app (a uvicorn protocol); :mod:`~service.api.uploads`: state uploads streamed to the state volume.
* :mod:`~service.api.docs`: ``/openapi.json`` completed, and the Swagger UI / ReDoc pages with their assets served
  from the package (no CDN).
"""
