"""Anomaly map encodings of /segment."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch
from PIL import Image

from service.engine.maps import encode_map


def test_png_map_round_trips_within_one_level() -> None:
    scores = torch.tensor([[-3.0, 0.0], [1.5, 7.0]])
    encoded = encode_map(scores, "png")
    image = Image.open(io.BytesIO(base64.b64decode(encoded["data"])))
    levels = np.asarray(image).astype(np.float64)
    assert levels.min() == 0 and levels.max() == 65535
    restored = encoded["min"] + levels / 65535 * (encoded["max"] - encoded["min"])
    assert np.abs(restored - scores.numpy()).max() <= 10.0 / 65535


def test_maps_with_non_finite_scores_stay_valid_json() -> None:
    scores = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]])
    assert encode_map(scores, "json")["data"] == [[1.0, None], [None, 3.0]]
    encoded = encode_map(scores, "png")
    assert (encoded["min"], encoded["max"]) == (1.0, 3.0)
    json.dumps(encoded, allow_nan=False)
