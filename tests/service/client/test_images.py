"""Images as the client takes them (paths, bytes, PIL images, numpy arrays) -> the files it sends, and ``/segment``
maps decoded back to arrays: each rule on a small hand-computed case."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.api.schemas import JsonMap, NpyMap, PngMap
from service.client import decode_map
from service.client.images import encode_image, encode_images


def _pixels(encoded: tuple[str, bytes, str]) -> np.ndarray:
    name, data, kind = encoded
    assert kind == "image/png" and name.endswith(".png")
    return np.asarray(Image.open(io.BytesIO(data)))


def test_arrays_become_png_by_the_services_rules() -> None:
    gray = np.array([[0, 7], [128, 255]], dtype=np.uint8)
    assert np.array_equal(_pixels(encode_image(gray)), gray)
    floats = np.array([[0.0, 0.5], [1.0, np.nan], [2.0, -1.0]])  # round(clip(v, 0, 1) * 255), NaN -> 0
    assert _pixels(encode_image(floats)).tolist() == [[0, 128], [255, 0], [255, 0]]
    assert _pixels(encode_image(np.array([[True, False]]))).tolist() == [[255, 0]]
    wide = np.array([[0, 65535, 300]], dtype=np.uint16)  # 16-bit grayscale kept as 16 bits
    _, data, _ = encode_image(wide)
    assert Image.open(io.BytesIO(data)).mode.startswith("I") and np.asarray(Image.open(io.BytesIO(data))).tolist() == [
        [0, 65535, 300]
    ]
    rgb = np.arange(2 * 2 * 3, dtype=np.int64).reshape(2, 2, 3)
    assert np.array_equal(_pixels(encode_image(rgb)), rgb.astype(np.uint8))
    assert np.array_equal(_pixels(encode_image(gray[:, :, None])), gray)  # H x W x 1 is grayscale


def test_arrays_the_service_could_not_read_the_same_way_are_refused() -> None:
    with pytest.raises(ValueError, match="within 0-255"):
        encode_image(np.array([[0, 256]], dtype=np.int32))
    with pytest.raises(ValueError, match="H x W or H x W x C"):
        encode_image(np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="not int"):
        encode_image(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no images"):
        encode_images([])


def test_paths_and_bytes_are_sent_as_they_are_and_batches_split(tmp_path: Path) -> None:
    path = tmp_path / "cat.jpg"
    path.write_bytes(b"\xff\xd8 not checked here")
    assert encode_image(path) == ("cat.jpg", path.read_bytes(), "image/jpeg")
    assert encode_image(str(path))[1] == path.read_bytes()
    assert encode_image(b"raw", 4) == ("image-4", b"raw", "application/octet-stream")
    batch = np.zeros((3, 4, 5, 3), dtype=np.uint8)  # N x H x W x C
    assert [np.asarray(Image.open(io.BytesIO(d))).shape for _, d, _ in encode_images(batch)] == [(4, 5, 3)] * 3
    assert len(encode_images([path, b"x", Image.new("L", (2, 2))])) == 3
    floating = Image.fromarray(np.array([[0.25, 1.0]], dtype=np.float32))  # mode F: PNG cannot hold it
    assert _pixels(encode_image(floating)).tolist() == [[64, 255]]


def test_maps_decode_to_scores() -> None:
    levels = np.array([[0, 65535, 32768]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    png = PngMap(
        format="png", bits=16, min=-1.0, max=3.0, height=1, width=3, data=base64.b64encode(buffer.getvalue()).decode()
    )
    # score = min + level / 65535 * (max - min)
    assert decode_map(png)[0].tolist() == pytest.approx([-1.0, 3.0, -1.0 + 32768 / 65535 * 4.0])
    buffer = io.BytesIO()
    np.save(buffer, np.array([[1.5, -2.0]], dtype=np.float16))
    npy = NpyMap(format="npy", dtype="float16", height=1, width=2, data=base64.b64encode(buffer.getvalue()).decode())
    assert decode_map(npy).dtype == np.float32 and decode_map(npy).tolist() == [[1.5, -2.0]]
    json_map = JsonMap(format="json", height=2, width=1, data=[[0.5], [None]])
    decoded = decode_map(json_map)
    assert decoded.shape == (2, 1) and decoded[0, 0] == 0.5 and np.isnan(decoded[1, 0])
