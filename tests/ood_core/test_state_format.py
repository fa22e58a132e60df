"""Hostile safetensors framing: every malformed file is an InvalidStateError, quickly, from bytes and from a path."""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ood_core.api import InvalidStateError
from ood_core.calibration import Calibration
from ood_core.detector import RMD, Mahalanobis
from ood_core.state import load_detector, read_state_info, save_detector
from ood_core.state_format import MAX_HEADER_BYTES, MAX_TENSORS, header_from_bytes


def frame(header: Any, body: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: ``header`` as raw bytes or as JSON, then ``body``; ``length`` overrides N."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def entry(dtype: Any = "F64", shape: Any = (2,), offsets: Any = (0, 16), **extra: Any) -> dict[str, Any]:
    spec = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape}
    spec["data_offsets"] = list(offsets) if isinstance(offsets, tuple) else offsets
    return {**spec, **extra}


def one(body: int = 16, **changes: Any) -> bytes:
    """One tensor ``a`` (F64, 2 elements) with fields replaced by ``changes``, and ``body`` data bytes."""
    return frame({"a": entry(**changes)}, bytes(body))


def raw_entry(text: str, body: int = 16) -> bytes:
    return frame(('{"a": ' + text + "}").encode(), bytes(body))


OK = '{"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}'

CASES: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "truncated"),
    "seven bytes": (b"\x02\x00\x00\x00\x00\x00\x00", "truncated"),
    "header length over the limit": (frame(b"{}", length=MAX_HEADER_BYTES + 1), "exceeds the limit of 1048576"),
    "header length 2**64 - 1": (b"\xff" * 8 + b"{}", "exceeds the limit"),
    "header past the end": (frame(b"{}", length=100), "truncated"),
    "empty header": (frame(b""), "not a JSON object"),
    "not JSON": (frame(b"{not json"), "not valid JSON"),
    "not UTF-8": (frame(b'{"\xff\xfe": 1}'), "UTF-8"),
    "UTF-16 JSON": (frame("{}".encode("utf-16")), "not a JSON object"),
    "leading space": (frame(b" " + OK.encode()), "not a JSON object"),
    "JSON list": (frame([]), "not a JSON object"),
    "JSON string": (frame("{}"), "not a JSON object"),
    "JSON null": (frame(None), "not a JSON object"),
    "object then garbage": (frame(b"{}{}"), "not valid JSON"),
    "duplicate tensor": (frame(('{"a": ' + OK + ', "a": ' + OK + "}").encode(), bytes(16)), "twice"),
    "duplicate field": (raw_entry('{"dtype": "F64", "dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'), "twice"),
    "entry is a list": (frame({"a": [1, 2]}), "exactly dtype, shape and data_offsets"),
    "entry is null": (frame({"a": None}), "exactly"),
    "entry lacks dtype": (frame({"a": {"shape": [2], "data_offsets": [0, 16]}}, bytes(16)), "exactly"),
    "entry lacks shape": (frame({"a": {"dtype": "F64", "data_offsets": [0, 16]}}, bytes(16)), "exactly"),
    "entry lacks offsets": (frame({"a": {"dtype": "F64", "shape": [2]}}, bytes(16)), "exactly"),
    "entry has an extra field": (one(extra=1), "exactly"),
    "dtype is a number": (one(dtype=5), "unknown dtype 5"),
    "dtype unknown": (one(dtype="F128"), "unknown dtype 'F128'"),
    "dtype lower case": (one(dtype="f64"), "unknown dtype"),
    "dtype complex": (one(dtype="C64"), "unknown dtype"),
    "dtype null": (one(dtype=None), "unknown dtype"),
    "shape is a string": (one(shape="2"), "shape must be a list"),
    "shape negative": (one(shape=(-2,)), "shape"),
    "shape float": (one(shape=(2.0,)), "shape"),
    "shape bool": (one(shape=(True, 2)), "shape"),
    "shape string entry": (one(shape=("2",)), "shape"),
    "shape rank 9": (one(shape=(1,) * 8 + (2,)), "at most 8"),
    "shape huge": (one(shape=(2**63, 0)), "shape"),
    "offsets a string": (one(offsets="0,16"), "data_offsets must be two"),
    "offsets one number": (one(offsets=(16,)), "data_offsets"),
    "offsets three numbers": (one(offsets=(0, 16, 32)), "data_offsets"),
    "offsets negative": (one(offsets=(-1, 15)), "data_offsets"),
    "offsets float": (one(offsets=(0.0, 16.0)), "data_offsets"),
    "offsets bool": (one(offsets=(False, 16)), "data_offsets"),
    "offsets reversed": (one(offsets=(16, 0)), "end before they begin"),
    "offsets huge": (one(offsets=(0, 10**30)), "spans"),
    "offsets 5000 digits": (
        raw_entry('{"dtype": "F64", "shape": [2], "data_offsets": [0, ' + "9" * 5000 + "]}"),
        "JSON",
    ),
    "offsets NaN": (raw_entry('{"dtype": "F64", "shape": [2], "data_offsets": [0, NaN]}'), "non-finite number NaN"),
    "offsets 1e999": (raw_entry('{"dtype": "F64", "shape": [2], "data_offsets": [0, 1e999]}'), "non-finite"),
    "size not shape x dtype": (one(shape=(3,)), "spans 16 bytes, its shape and dtype need 24"),
    "overlap": (frame({"a": entry(), "b": entry(offsets=(8, 24))}, bytes(24)), "overlaps"),
    "gap": (
        frame({"a": entry(shape=(1,), offsets=(0, 8)), "b": entry(shape=(1,), offsets=(16, 24))}, bytes(24)),
        "gap",
    ),
    "not starting at 0": (one(offsets=(8, 24), body=24), "gap"),
    "data past the end": (one(body=8), "truncated: tensors need 16 bytes of data, file has 8"),
    "trailing garbage": (one(body=20), "padded: 4 trailing bytes"),
    "data but no tensor": (frame({}, b"xx"), "padded"),
    "metadata a list": (frame({"__metadata__": ["a"]}), "metadata is not a JSON object"),
    "metadata a string": (frame({"__metadata__": "a"}), "metadata is not a JSON object"),
    "metadata null": (frame({"__metadata__": None}), "metadata is not a JSON object"),
    "metadata int value": (frame({"__metadata__": {"a": 1}}), "strings to strings"),
    "metadata null value": (frame({"__metadata__": {"a": None}}), "strings to strings"),
    "metadata nested value": (frame({"__metadata__": {"a": {"b": "c"}}}), "strings to strings"),
    "metadata lone surrogate": (frame(b'{"__metadata__": {"a": "\\udc00"}}'), "strings to strings"),
    "name lone surrogate": (frame(('{"\\ud800": ' + OK + "}").encode(), bytes(16)), "name"),
    "name empty": (frame({"": entry()}, bytes(16)), "name"),
    "name with a newline": (frame({"a\nb": entry()}, bytes(16)), "name"),
    "name too long": (frame({"x" * 300: entry()}, bytes(16)), "name"),
    "nesting too deep": (frame(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "not valid JSON"),
    "too many tensors": (frame({f"t{i}": entry("F32", (0,), (0, 0)) for i in range(MAX_TENSORS + 1)}), "more than 256"),
    "escaped field names": (
        frame(
            (
                "{"
                + ", ".join(
                    f'"t{i}": {{"dtype": "F32", "shape": [0], "data_offset\\u0073": [0, 0]}}' for i in range(300)
                )
            ).encode()
            + b"}"
        ),
        "more than 256",
    ),
    "valid framing, no state": (frame({}), "not an ood-serve detector state"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_files_are_invalid_states(name: str, tmp_path: Path) -> None:
    data, message = CASES[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    for source in (data, bytearray(data), path):
        for call in (load_detector, read_state_info):
            with pytest.raises(InvalidStateError, match=message) as err:
                call(source)
            assert str(tmp_path) not in str(err.value) and len(str(err.value)) < 400


def test_valid_framing_matches_safetensors_own_writer() -> None:
    data = save_detector(Mahalanobis(None).fit_features(torch.randn(12, 3), torch.arange(12) % 2))
    header = header_from_bytes(memoryview(data))
    assert set(header.entries) == {"mu", "precision"} and header.data_start + header.data_size == len(data)
    assert header.entries["precision"].shape == (3, 3) and header.metadata["class"] == "Mahalanobis"


def test_real_headers_are_far_below_the_limit() -> None:
    """Calibration scores are tensors, not metadata: even a sketch of 10,000 quantiles keeps the header small."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 10
    det = RMD(None).fit_features(torch.randn(200, 64, generator=g), y)
    calibration = Calibration.from_scores(torch.randn(50_000, generator=g))
    data = save_detector(det, calibration=calibration)
    header_len = int.from_bytes(data[:8], "little")
    assert header_len < 2048 < MAX_HEADER_BYTES // 500
    assert load_detector(data).calibration is not None


def test_truncation_at_every_byte_is_refused() -> None:
    data = save_detector(Mahalanobis(None).fit_features(torch.randn(12, 3), torch.arange(12) % 2))
    for cut in range(len(data)):
        with pytest.raises(InvalidStateError):
            load_detector(data[:cut])


def refusal(data: bytes) -> tuple[float, str]:
    start = time.perf_counter()
    with pytest.raises(InvalidStateError) as err:
        load_detector(data)
    return time.perf_counter() - start, str(err.value)


def test_huge_header_of_empty_tensors_is_refused_at_once() -> None:
    """200,000 empty tensors: 13 MB of header, which the previous loader parsed for ~3 s before refusing."""
    empty = b'{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    data = frame(b"{" + b", ".join(b'"t%d": %s' % (i, empty) for i in range(200_000)) + b"}")
    assert len(data) > 7_000_000
    elapsed, message = refusal(data)
    assert "exceeds the limit of 1048576 bytes (MAX_HEADER_BYTES, 1 MiB)" in message
    assert elapsed < 0.5  # microseconds in practice: only the first 8 bytes are read


def test_many_tensors_within_the_header_limit_are_refused_before_parsing() -> None:
    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(14_000)}
    data = frame(entries)
    assert 8 + 900_000 < len(data) < MAX_HEADER_BYTES
    elapsed, message = refusal(data)
    assert f"more than {MAX_TENSORS} tensors (MAX_TENSORS)" in message
    assert elapsed < 0.5


def test_random_corruption_is_refused_or_harmless() -> None:
    """Seeded bit flips, byte overwrites, truncations and appended bytes of a valid state: never anything but
    InvalidStateError; any change to the tensor data is refused (the digest)."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(40) % 4
    det = Mahalanobis(None).fit_features(torch.randn(40, 5, generator=g) + y[:, None], y)
    data = save_detector(det, calibration=Calibration.from_scores(torch.randn(30, generator=g)))
    data_start = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    loaded = refused = 0
    for case in range(400):
        buf, kind = bytearray(data), case % 4
        pos = rng.randrange(len(data)) if case % 8 < 4 else rng.randrange(data_start, len(data))
        if kind == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[pos] = (buf[pos] + rng.randrange(1, 256)) % 256
        elif kind == 2:
            del buf[pos:]
        else:
            buf += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        try:
            load_detector(bytes(buf))
        except InvalidStateError as exc:
            refused += 1
            if kind < 2 and pos >= data_start:
                assert "tensor digest mismatch" in str(exc)
            continue
        loaded += 1
        assert kind < 2 and 8 <= pos < data_start, f"case {case}: a change at {pos} (kind {kind}) was accepted"
    assert refused > 300 and loaded < 100
