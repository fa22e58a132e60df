"""How ``test_schemathesis.py`` and ``bench/fuzz.sh`` steer schemathesis' generation: :data:`CONFIG_TOML` (its
dictionaries and per-operation checks) and the :func:`map_case` hook; :func:`is_write` / :func:`is_job_write` say
which operations go to the write servers.

Generation is steered towards the real API so that the success paths are reached, not only the 404/422 of random
names; the steering is shared with ``bench/fuzz.sh`` (the same fuzzing with the schemathesis CLI at a large
example count, :data:`CONFIG_TOML` and :func:`map_case`):

* path and query parameters: schemathesis *dictionaries* (:data:`CONFIG_TOML`) draw the demo's model names
  (``digits`` for ``/score``, ``digits-seg`` for ``/segment``), detector names and ``?detectors=`` lists with
  probability 0.8 / 0.5; the rest is generated from the schema as usual. Dictionaries are mode-aware: a value is
  used in negative cases only where it violates the schema, so negative cases stay negative.
* bodies (:func:`map_case`, only where schemathesis generated the body in *positive* mode, i.e. claims it is
  valid): the images (multipart ``files`` or JSON ``instances[].b64``) are replaced by real PNGs, upload bodies by
  a real state file of that model (downloaded from the read server), and ``/fit`` bodies get labels that match
  the images, a detector class that model can fit without a fit step, ``hparams={}`` and ``calibration_share
  =0.5``; ``/v2/.../infer`` bodies get one real ``images`` tensor (base64 PNGs) and no output names. The schema
  cannot say "a decodable image" or "a valid state file", so without this every positive body is rejected with 422
  and ``positive_data_acceptance`` would test nothing. Structure that the schema does
  describe (empty or oversized lists, missing optional parts, extra properties, query values) is left as
  generated, so the checks still see schema-valid requests the server refuses.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
from schemathesis import Case, GenerationMode, HookContext
from schemathesis.core.parameters import ParameterLocation

from tests.service.conftest import noise_png, png_bytes

REQUEST_TIMEOUT_S = 30.0
CLASSIFIER, SEGMENTER = "digits", "digits-seg"
STATE_SOURCES = {CLASSIFIER: "msp", SEGMENTER: "energy"}
"""The demo detector whose state is uploaded in positive ``PUT`` cases, per model."""
FIT_CLASSES = {
    CLASSIFIER: ["MaxSoftmax", "EnergyBased", "MaxLogit", "Entropy"],
    SEGMENTER: ["EnergyBased", "Entropy", "MaxLogit"],
}
"""Detector classes without a fit step that the model can serve (positive ``/fit`` cases)."""

CONFIG_TOML = f"""
[dictionaries.models]
values = ["{CLASSIFIER}", "{SEGMENTER}"]

[dictionaries.classifiers]
values = ["{CLASSIFIER}"]

[dictionaries.segmenters]
values = ["{SEGMENTER}"]

[dictionaries.detectors]
values = ["mahalanobis", "knn", "msp", "energy", "entropy", "maxlogit", "fuzzed-1", "fuzzed.2"]

[dictionaries.detector-lists]
values = ["mahalanobis", "msp,energy", "knn,mahalanobis,msp,energy", "energy,entropy,maxlogit", "entropy", "nope"]

# 413 rejects schema-violating requests too: more images than maxItems (the image-count limit) is "Too many images"
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

[parameters]
"path.model" = {{ dictionary = "models", probability = 0.8 }}
"path.name" = {{ dictionary = "detectors", probability = 0.8 }}
"query.detectors" = {{ dictionary = "detector-lists", probability = 0.5 }}

[[operations]]
include-path-regex = "/score$"
parameters = {{ "path.model" = {{ dictionary = "classifiers", probability = 0.8 }} }}

[[operations]]
include-path-regex = "/segment$"
parameters = {{ "path.model" = {{ dictionary = "segmenters", probability = 0.8 }} }}
# 413 is a designed answer to schema-valid /segment requests: the map-pixel and response-size limits are products
# of several parameters (images x detectors x ?size= x format), which a schema cannot state
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "5xx"]

[[operations]]
include-path-regex = "/infer$"
# the Open Inference Protocol answers a schema-valid request whose tensors hold no images (data not matching the
# shape, strings that are not base64 image files, unknown output names) with 400, which a schema cannot state; 413
# past the image-count limit
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "413", "429", "5xx"]
"""
"""Schemathesis configuration shared with ``bench/fuzz.sh`` (which writes it to a ``schemathesis.toml``)."""


# ---------------------------------------------------------------------------------------------- steering
def _images() -> list[bytes]:
    """Real PNGs of a few sizes and kinds (grayscale, RGB, not square), decodable by the service."""
    import numpy as np

    rgb = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return [noise_png(0), noise_png(1, size=64), png_bytes(rgb), noise_png(2, size=17)]


IMAGES: list[bytes] = _images()
STATES: dict[str, bytes] = {}
"""A valid state file per model name (for positive ``PUT`` cases); filled by :func:`load_states`."""


def load_states(url: str) -> None:
    """Download one state per demo model from the server at ``url`` into :data:`STATES`."""
    for model, detector in STATE_SOURCES.items():
        response = httpx.get(f"{url}/v1/models/{model}/detectors/{detector}", timeout=REQUEST_TIMEOUT_S)
        response.raise_for_status()
        STATES[model] = response.content


def _positive_body(case: Case) -> bool:
    meta = case.meta
    if meta is None or not isinstance(case.body, dict | bytes | str):
        return False
    component = meta.components.get(ParameterLocation.BODY)
    mode = component.mode if component is not None else meta.generation.mode
    return mode == GenerationMode.POSITIVE


def _steer_images(case: Case, fit_model: str | None) -> None:
    body = case.body
    assert isinstance(body, dict)
    if case.media_type == "application/json":
        instances = body.get("instances")
        if not isinstance(instances, list):
            return
        if fit_model is not None and len(instances) == 1:
            instances.append(dict(instances[0]))  # a calibration split needs two ID images
        for index, instance in enumerate(instances):
            if isinstance(instance, dict):
                instance["b64"] = base64.b64encode(IMAGES[index % len(IMAGES)]).decode()
                if fit_model is not None:
                    instance["label"] = index % 6
        if fit_model is not None:
            body.update(detector_class=FIT_CLASSES[fit_model][len(instances) % len(FIT_CLASSES[fit_model])])
            body.update(hparams={}, calibration_share=0.5)
    elif case.media_type is not None and case.media_type.startswith("multipart/"):
        files = body.get("files")
        if not isinstance(files, list):
            return
        if fit_model is not None and len(files) == 1:
            files.append(files[0])
        body["files"] = [IMAGES[index % len(IMAGES)] for index in range(len(files))]
        if fit_model is not None:
            body["labels"] = ",".join(str(index % 6) for index in range(len(files)))
            body["detector_class"] = FIT_CLASSES[fit_model][len(files) % len(FIT_CLASSES[fit_model])]
            body.update(hparams="{}", calibration_share=0.5)


def _fit_archive() -> bytes:
    """A zip of the images in class folders (``0/`` .. ``3/``): a fit job's data."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, image in enumerate(IMAGES * 2):
            archive.writestr(f"{index % 4}/{index}.png", image)
    return buffer.getvalue()


def _steer_fit(case: Case, fit_model: str | None) -> None:
    """A fit job that can run: images with labels (or an archive), a class the model fits without a fit step, no
    ``source`` (the test servers set no OOD_FIT_DATA_ROOT: that refusal is a designed 400) and JSON ``hparams``."""
    query = case.query if isinstance(case.query, dict) else None
    if fit_model is not None and query is not None:
        if "hparams" in query:
            query["hparams"] = "{}"
        query["detector_class"] = FIT_CLASSES[fit_model][0]
    if not isinstance(case.body, dict):  # an archive as the raw body
        case.body = _fit_archive()
        return
    body = case.body
    body.pop("source", None)
    body.pop("file", None)
    if case.media_type == "application/json" and not isinstance(body.get("instances"), list):
        body["instances"] = [{"b64": "", "label": 0}, {"b64": "", "label": 1}]
    elif case.media_type is not None and case.media_type.startswith("multipart/") and not body.get("files"):
        body["files"] = IMAGES[:2]
    _steer_images(case, fit_model)


def map_case(context: HookContext, case: Case) -> Case:
    """Make the body of a positive case what the schema means but cannot say: real images, a real state file, a
    fit request that can succeed (see the module docstring). Negative cases are left alone."""
    if not _positive_body(case):
        return case
    operation = case.operation
    model = (case.path_parameters or {}).get("model")
    if operation.path.endswith(("/score", "/segment")):
        _steer_images(case, fit_model=None)
    elif operation.path.endswith("/fit"):
        _steer_fit(case, fit_model=model if model in FIT_CLASSES else None)
    elif (
        operation.path.endswith("/infer") and isinstance(case.body, dict) and isinstance(case.body.get("inputs"), list)
    ):
        count = 1 + len(case.body["inputs"]) % len(IMAGES)  # the one V2 input: real images (BYTES, base64)
        data = [base64.b64encode(image).decode() for image in IMAGES[:count]]
        case.body["inputs"] = [{"name": "images", "datatype": "BYTES", "shape": [count], "data": data}]
        case.body.pop("outputs", None)  # names of the model's outputs, which the schema cannot list
    elif operation.method.upper() == "PUT" and model in STATES:
        if isinstance(case.body, dict) and "file" in case.body:
            case.body["file"] = STATES[model]
        elif isinstance(case.body, bytes | str):
            case.body = STATES[model]
    # The steered body is what generation produced, not a later edit: without this schemathesis would revalidate
    # it, and a body holding binary parts (multipart files, a state file) cannot be validated and would be relabelled
    # negative, making negative_data_rejection expect a refusal of a valid request. Private API of schemathesis 4.
    case._record_starting_state()
    return case


def is_write(ctx: Any) -> bool:
    """The operations that change detector states or jobs (run against the write servers only)."""
    operation = ctx.operation
    return operation.method.upper() in ("PUT", "DELETE") or operation.path.endswith(("/fit", "/rollback"))


def is_job_write(ctx: Any) -> bool:
    """The writes of the jobs and versions (cancel, rollback): without a key they go to a server of their own, so
    that each no-key write server's failed-auth limiter (30 a minute) sees the failures of fewer operations."""
    operation = ctx.operation
    return is_write(ctx) and (operation.path.startswith("/v1/jobs") or operation.path.endswith("/rollback"))
