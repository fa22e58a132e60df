"""The Open Inference Protocol's wire format: an infer body -> its validated JSON header and input tensors, and
output tensors -> an answer body; JSON tensors and the binary tensor data extension.

Binary extension (Triton, ``docs/protocol/extension_binary_data.md``): the body is the JSON header (its length
in the ``Inference-Header-Content-Length`` header) followed by the bytes of every input whose ``parameters`` give
a ``binary_data_size``, in input order; elements are little-endian, row-major, without padding, and a ``BYTES``
element is a 4-byte little-endian length followed by its bytes. Outputs go back the same way when the request
asks (``binary_data`` on an output, else ``binary_data_output`` on the request): then the answer is
``application/octet-stream`` with its own ``Inference-Header-Content-Length``.

In JSON, ``BYTES`` elements are strings: here each is the base64 of one encoded image file (JSON strings cannot
carry raw bytes). Non-finite floats, which JSON cannot write, are ``null`` in JSON outputs.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from service.api.v2_schemas import ParameterValue, V2InferRequest, V2RequestInput
from service.engine.decode import RawImage
from service.errors import BadRequestError

BINARY_EXTENSION = "binary_tensor_data"
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
WIRE_DTYPES: dict[str, str] = {"BOOL": "|b1", "UINT8": "|u1", "INT64": "<i8", "FP32": "<f4", "FP64": "<f8"}
"""Element layout of the datatypes this service reads or writes."""


@dataclass(frozen=True)
class InferBody:
    """A parsed infer body: the JSON header and, per input (same order), its binary bytes or ``None`` (JSON data)."""

    request: V2InferRequest
    binary: list[bytes | None]


def parse_body(body: bytes, header_length: str | None) -> InferBody:
    """Split the body at ``Inference-Header-Content-Length`` (absent: all JSON), validate the header and cut the
    binary part into the inputs' ``binary_data_size`` slices, which must cover it exactly."""
    if header_length is None:
        header, rest = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise BadRequestError(
                f"{HEADER_LENGTH} must be the byte length of the JSON header, between 0 and the body's {len(body)} "
                f"bytes; got {header_length[:32]!r}"
            )
        header, rest = body[:length], body[length:]
    request = _validate(header, hint=header_length is None)
    binary: list[bytes | None] = []
    offset = 0
    for tensor in request.inputs:
        size = tensor.parameters.binary_data_size if tensor.parameters is not None else None
        if size is None:
            binary.append(None)
            continue
        if header_length is None:
            raise BadRequestError(
                f"input {tensor.name!r} has binary_data_size but the {HEADER_LENGTH} header is missing"
            )
        if tensor.data is not None:
            raise BadRequestError(f"input {tensor.name!r} has both JSON data and binary_data_size")
        if offset + size > len(rest):
            raise BadRequestError(
                f"input {tensor.name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(rest) - offset} bytes left after the JSON header and the inputs before it)"
            )
        binary.append(rest[offset : offset + size])
        offset += size
    if offset != len(rest):
        raise BadRequestError(
            f"{len(rest) - offset} bytes after the JSON header belong to no input (the binary_data_size of the "
            f"inputs add up to {offset}, the body has {len(rest)} after the header)"
        )
    return InferBody(request, binary)


def _validate(header: bytes, hint: bool) -> V2InferRequest:
    """``hint``: the request has no header length, so binary data after the JSON would be a JSON error."""
    try:
        return V2InferRequest.model_validate_json(header)
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False)[:5]:
            where = ".".join(str(p) for p in err.get("loc", ())) or "body"
            parts.append(f"{where}: {err.get('msg')}")
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        if hint and any(err.get("type") == "json_invalid" for err in exc.errors()):
            more += f" (binary tensor data after the JSON needs the {HEADER_LENGTH} header)"
        raise BadRequestError(f"invalid inference request: {'; '.join(parts)}{more}") from None


def element_count(tensor: V2RequestInput) -> int:
    return math.prod(tensor.shape)


def image_files(tensor: V2RequestInput, binary: bytes | None) -> list[RawImage]:
    """A ``BYTES`` tensor -> its elements as encoded image files (JSON: base64 strings)."""
    count = element_count(tensor)
    name = tensor.name
    if binary is not None:
        elements = _split_bytes(name, binary)
    else:
        data = _flat(tensor)
        if not all(isinstance(item, str) for item in data):
            raise BadRequestError(f"input {name!r}: BYTES elements in JSON must be strings (base64 image files)")
        elements = []
        for index, item in enumerate(data):
            try:
                elements.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise BadRequestError(f"input {name!r}: element {index} is not valid base64") from None
    if len(elements) != count:
        raise BadRequestError(
            f"input {name!r} has shape {tensor.shape} ({count} elements) but {len(elements)} elements"
        )
    return [RawImage(data, f"{name}[{index}]") for index, data in enumerate(elements)]


def _split_bytes(name: str, binary: bytes) -> list[bytes]:
    out: list[bytes] = []
    offset = 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise BadRequestError(f"input {name!r}: truncated BYTES element length at byte {offset}")
        (size,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + size > len(binary):
            raise BadRequestError(f"input {name!r}: BYTES element {len(out)} of {size} bytes runs past its data")
        out.append(binary[offset : offset + size])
        offset += size
    return out


def _flat(tensor: V2RequestInput) -> list[Any]:
    if tensor.data is None:
        raise BadRequestError(f"input {tensor.name!r} has no data (neither JSON 'data' nor binary_data_size)")
    flat: list[Any] = []
    stack: list[Any] = [iter(tensor.data)]
    while stack:  # iterative: nesting depth cannot exhaust the stack
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


_END = object()


def numeric_array(tensor: V2RequestInput, binary: bytes | None) -> np.ndarray:
    """A ``UINT8`` or ``FP32`` tensor -> a numpy array of its shape (JSON: integers 0..255 / numbers)."""
    count, name, datatype = element_count(tensor), tensor.name, tensor.datatype
    dtype = np.dtype(WIRE_DTYPES[datatype])
    if binary is not None:
        if len(binary) != count * dtype.itemsize:
            raise BadRequestError(
                f"input {name!r}: shape {tensor.shape} of {datatype} needs {count * dtype.itemsize} bytes, "
                f"binary_data_size is {len(binary)}"
            )
        return np.frombuffer(binary, dtype=dtype).reshape(tensor.shape)
    data = _flat(tensor)
    if len(data) != count:
        raise BadRequestError(f"input {name!r} has shape {tensor.shape} ({count} elements) but {len(data)} elements")
    if datatype == "UINT8":
        if not all(type(v) is int and 0 <= v <= 255 for v in data):
            raise BadRequestError(f"input {name!r}: UINT8 elements must be integers 0..255")
    elif not all(type(v) in (int, float) for v in data):
        raise BadRequestError(f"input {name!r}: {datatype} elements must be numbers")
    return np.asarray(data, dtype=dtype).reshape(tensor.shape)


@dataclass(frozen=True)
class OutputTensor:
    """One output: its name, protocol datatype, values (of the output's shape) and parameters."""

    name: str
    datatype: str
    array: np.ndarray
    parameters: dict[str, ParameterValue] = field(default_factory=dict)


def encode_answer(head: dict[str, Any], outputs: list[tuple[OutputTensor, bool]]) -> tuple[bytes, dict[str, str]]:
    """The answer body and its headers: ``head`` (``model_name``, ``model_version``, ``id``) plus the outputs,
    each as JSON data or (``True``) as binary data after the JSON header."""
    entries, chunks = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.array.shape)}
        parameters: dict[str, ParameterValue] = dict(tensor.parameters)
        if binary:
            data = np.ascontiguousarray(tensor.array, dtype=WIRE_DTYPES[tensor.datatype]).tobytes()
            parameters["binary_data_size"] = len(data)
            chunks.append(data)
        else:
            entry["data"] = tensor.array.reshape(-1).tolist()  # orjson writes NaN / inf as null
        if parameters:
            entry["parameters"] = parameters
        entries.append(entry)
    header = orjson.dumps({**head, "outputs": entries})
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": BINARY_MEDIA_TYPE, HEADER_LENGTH: str(len(header))}
