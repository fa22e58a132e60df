import pytest
import torch

from ood_core.data import BACKGROUND_THRESHOLD, load_split, make_mosaics, make_mosaics_with_digits

QUADRANTS = [(slice(0, 32), slice(0, 32)), (slice(0, 32), slice(32, 64)), (slice(32, 64), slice(0, 32))]
QUADRANTS.append((slice(32, 64), slice(32, 64)))


def test_mosaic_shapes_dtypes_and_label_set() -> None:
    images, labels = make_mosaics(12, ood_share=0.5, seed=0)
    assert images.shape == (12, 1, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (12, 64, 64) and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    assert set(labels.unique().tolist()) <= {-1, 0, 1, 2, 3, 4, 5, 6}


def test_pixel_labels_follow_the_digit_placed_in_each_quadrant() -> None:
    images, labels, digits = make_mosaics_with_digits(16, ood_share=0.5, seed=2)
    for i in range(16):
        for q, (rows, cols) in enumerate(QUADRANTS):
            tile, tile_labels = images[i, 0, rows, cols], labels[i, rows, cols]
            foreground = tile >= BACKGROUND_THRESHOLD
            expected = int(digits[i, q]) + 1 if digits[i, q] < 6 else -1
            assert foreground.any()
            assert torch.all(tile_labels[foreground] == expected)
            assert torch.all(tile_labels[~foreground] == 0)


def test_tiles_are_digits_of_the_requested_split_with_the_reported_class() -> None:
    images, _, digits = make_mosaics_with_digits(6, ood_share=0.5, seed=1, split="calibration")
    pool_images, pool_classes = load_split("calibration", seed=1)
    ood_images, _ = load_split("near_ood")
    for i in range(6):
        for q, (rows, cols) in enumerate(QUADRANTS):
            tile = images[i, 0, rows, cols]
            source = pool_images if digits[i, q] < 6 else ood_images
            matches = (source[:, 0] == tile).flatten(1).all(1)
            assert matches.any()
            if digits[i, q] < 6:
                assert int(digits[i, q]) in pool_classes[matches].tolist()


@pytest.mark.parametrize(("n", "share"), [(10, 0.0), (10, 0.3), (7, 0.5), (5, 1.0)])
def test_the_chosen_share_of_mosaics_holds_exactly_one_ood_digit(n: int, share: float) -> None:
    _, labels, digits = make_mosaics_with_digits(n, ood_share=share, seed=0)
    ood_digits_per_mosaic = (digits >= 6).sum(1)
    assert int((ood_digits_per_mosaic == 1).sum()) == round(share * n)
    assert ood_digits_per_mosaic.max() <= 1
    has_ood_pixels = (labels == -1).flatten(1).any(1)
    assert torch.equal(has_ood_pixels, ood_digits_per_mosaic == 1)


def test_mosaics_are_deterministic_and_seed_dependent() -> None:
    first, second = make_mosaics(5, seed=4), make_mosaics(5, seed=4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], make_mosaics(5, seed=5)[0])


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        make_mosaics(3, ood_share=1.5)
    with pytest.raises(ValueError):
        make_mosaics(3, split="near_ood")
    with pytest.raises(ValueError):
        make_mosaics(-1)
