"""Outlier pasting on generated images: pasted pixels carry the object and the OOD label, nothing else changes,
sizes, margins, types, RGBA cut-outs, the probability and several objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ood_core.augment import OutlierPaste, as_cutout


def red_disc(size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A red object on a blue background whose mask is a disc: only the disc may be pasted."""
    img = torch.zeros(3, size, size)
    img[2] = 1.0
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 <= (size / 2 - 1) ** 2
    img[0, mask], img[2, mask] = 1.0, 0.0
    return img, mask


def scene(h: int = 64, w: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((3, h, w), 0.5), torch.randint(0, 5, (h, w), generator=torch.Generator().manual_seed(0))


def test_exact_paste_without_scaling_rotation_or_flip() -> None:
    obj, mask = red_disc()
    paste = OutlierPaste(
        [(obj, mask)], p=1.0, scale=(1.0, 1.0), rotate=False, flip=False, generator=torch.Generator().manual_seed(1)
    )
    img, target = scene()
    out, out_target = paste(img, target)
    pasted = out_target == -1
    assert int(pasted.sum()) == int(mask.sum())  # exactly the object's pixels
    assert torch.all(out[:, pasted] == torch.tensor([[1.0], [0.0], [0.0]]))  # red, never the blue background
    assert torch.equal(out[:, ~pasted], img[:, ~pasted]) and torch.equal(out_target[~pasted], target[~pasted])
    assert torch.equal(img, scene()[0])  # the input is not modified
    rows, cols = torch.nonzero(pasted, as_tuple=True)
    assert rows.min() >= 10 and cols.min() >= 10 and rows.max() < 64 - 10 and cols.max() < 80 - 10  # margins


def test_random_pastes_label_object_pixels_ood_and_keep_the_rest() -> None:
    obj, mask = red_disc(20)
    paste = OutlierPaste([(obj, mask)], p=1.0, n=2, scale=(0.5, 1.5), generator=torch.Generator().manual_seed(2))
    for _ in range(20):
        img, target = scene()
        out, out_target = paste(img, target)
        pasted = out_target == -1
        assert pasted.any() and out.shape == img.shape and out_target.dtype == torch.int64
        assert out.min() >= 0 and out.max() <= 1
        # resampled with premultiplied alpha: pasted pixels mix object colors only, never its blue background
        torch.testing.assert_close(out[:, pasted], torch.tensor([[1.0], [0.0], [0.0]]).expand(3, int(pasted.sum())))
        assert torch.equal(out[:, ~pasted], img[:, ~pasted]) and torch.equal(out_target[~pasted], target[~pasted])


def test_large_objects_are_shrunk_to_fit_and_the_ood_value_is_configurable() -> None:
    obj, mask = torch.ones(3, 200, 50), torch.ones(200, 50, dtype=torch.bool)
    paste = OutlierPaste(
        [(obj, mask)], p=1.0, ood_mask_value=254, rotate=False, generator=torch.Generator().manual_seed(3)
    )
    _, target = paste(*scene(40, 40))
    rows, cols = torch.nonzero(target == 254, as_tuple=True)
    assert rows.numel() > 0 and rows.min() >= 10 and rows.max() < 30 and cols.min() >= 10 and cols.max() < 30


def test_probability_zero_leaves_the_sample_and_converts_the_target() -> None:
    img, target = scene()
    out, out_target = OutlierPaste([red_disc()], p=0.0)(img, target.numpy().astype(np.uint8))
    assert out is img and out_target.dtype == torch.int64 and torch.equal(out_target, target)


def test_pil_and_uint8_inputs_come_back_in_their_type_and_rgba_cutouts_work() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = (0, 255, 0, 255)  # an opaque green square; the rest is transparent
    cutout = Image.fromarray(rgba, mode="RGBA")
    img, mask = as_cutout(cutout)
    assert img.shape == (3, 16, 16) and int(mask.sum()) == 64
    paste = OutlierPaste([cutout], p=1.0, scale=(1.0, 1.0), rotate=False, generator=torch.Generator().manual_seed(4))
    pil = Image.fromarray(np.full((48, 48, 3), 128, dtype=np.uint8))
    out, target = paste(pil, np.zeros((48, 48), dtype=np.int64))
    assert isinstance(out, Image.Image) and out.size == (48, 48) and int((target == -1).sum()) == 64
    assert (np.asarray(out)[target.numpy() == -1] == (0, 255, 0)).all()
    as_uint8 = torch.full((3, 48, 48), 128, dtype=torch.uint8)
    out_t, _ = paste(as_uint8, torch.zeros(48, 48))
    assert out_t.dtype == torch.uint8 and out_t.shape == (3, 48, 48)


def test_invalid_arguments_and_inputs_raise() -> None:
    with pytest.raises(ValueError):
        OutlierPaste([red_disc()], p=1.5)
    with pytest.raises(ValueError, match="alpha"):
        as_cutout(Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="mask"):
        as_cutout((torch.zeros(3, 4, 4), torch.zeros(5, 5)))
    with pytest.raises(ValueError, match="target"):
        OutlierPaste([red_disc()], p=1.0)(torch.zeros(3, 8, 8), torch.zeros(4, 4))
