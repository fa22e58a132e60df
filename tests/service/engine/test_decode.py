"""Image decoding rules (``service/engine/decode.py``): hand-computed values for wide modes, alpha, palettes, CMYK,
EXIF orientation, animations and 1-bit images; 413 before decoding for bombs; 422 naming the source for the rest.

Every file is built here (Pillow, or a minimal PNG writer for what Pillow does not write: 16-bit colour, bomb
headers)."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from service.engine.decode import RawImage, decode_image, load_image, open_image, to_8bit
from service.engine.preprocess import Preprocessor
from service.errors import ImageDecodeError, ImageTooLargeError
from service.settings import PreprocessConfig
from tests.service.conftest import encode, png_chunk

LIMIT = 25_000_000


def raw_png(width: int, height: int, bit_depth: int, color_type: int, scanlines: bytes = b"") -> bytes:
    """A PNG with any IHDR (``scanlines``: filter byte + samples per row, already big-endian)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(scanlines))
        + png_chunk(b"IEND", b"")
    )


def decode(data: bytes, source: str = "test.img") -> Image.Image:
    return decode_image(RawImage(data, source), LIMIT)


def values(image: Image.Image) -> list[Any]:
    """Pixel values in row order: ints (one band) or ``[r, g, b]`` lists."""
    array = np.asarray(image)
    return list(array.reshape(image.height * image.width, *array.shape[2:]).tolist())


def gray_pixels(image: Image.Image, size: tuple[int, int]) -> list[int]:
    pre = Preprocessor(PreprocessConfig(mode="L", mean=[0.0], std=[1.0]), size)
    return [int(v) for v in pre.pixels(image).flatten()]


# --- wide modes keep their range --------------------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped() -> None:
    data = encode(Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # what a 16-bit grayscale PNG opens as
    image = decode(data)
    assert image.mode == "L" and values(image) == [0, 100, 255]
    assert gray_pixels(image, (1, 3)) == [0, 100, 255]
    rgb = Preprocessor(PreprocessConfig(mode="RGB"), (1, 3)).pixels(image)
    assert rgb[:, 0].tolist() == [[0, 100, 255]] * 3


def test_16_bit_rounding_and_32_bit_integers_are_clipped_to_16_bits() -> None:
    # round(v / 257): 128 -> 0 (0.498), 129 -> 1 (0.502), 385 -> 1 (1.498), 386 -> 2 (1.502)
    wide = np.array([[128, 129, 385, 386]], dtype=np.uint16)
    assert values(to_8bit(Image.fromarray(wide))) == [0, 1, 1, 2]
    ints = np.array([[-5, 0, 25700, 65535, 70000]], dtype=np.int32)  # mode I: outside 0..65535 clipped first
    image = Image.fromarray(ints)
    assert image.mode == "I" and values(to_8bit(image)) == [0, 0, 100, 255, 255]


def test_float_images_are_intensities_in_0_1() -> None:
    floats = np.array([[np.nan, -1.0, 0.0, 0.2, 0.5, 1.0, 2.0, np.inf, -np.inf]], dtype=np.float32)
    image = Image.fromarray(floats)
    assert image.mode == "F"
    # 0.2 * 255 = 51, 0.5 * 255 = 127.5 -> 128 (rint), clipped above 1 and below 0, NaN -> 0
    assert values(to_8bit(image)) == [0, 0, 0, 51, 128, 255, 255, 255, 0]


def test_16_bit_colour_and_gray_alpha_pngs() -> None:
    rgb16 = raw_png(2, 1, 16, 2, b"\x00" + struct.pack(">6H", 65535, 25700, 0, 0, 65535, 257))
    image = decode(rgb16)
    assert image.mode == "RGB" and values(image) == [[255, 100, 0], [0, 255, 1]]  # Pillow keeps the high byte
    # 16-bit gray + alpha: gray 25700 (100) at alpha 32768 (128) -> 100 * 128 / 255 = 50; opaque 25700 -> 100
    la16 = raw_png(2, 1, 16, 4, b"\x00" + struct.pack(">4H", 25700, 32768, 25700, 65535))
    assert gray_pixels(decode(la16), (1, 2)) == [50, 100]


def test_preprocessing_applies_the_mode_rules_to_any_image() -> None:
    # not through decode_image: Preprocessor.pixels scales a raw I;16 image itself
    assert gray_pixels(Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)), (1, 3)) == [0, 100, 255]


# --- EXIF orientation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "corner"),
    [
        (1, (0, 0)),  # as stored: the mark stays top-left
        (6, (0, 1)),  # rotate 90 degrees clockwise to show: stored top-left -> top-right
        (8, (1, 0)),  # rotate 90 degrees counter-clockwise: stored top-left -> bottom-left
        (3, (1, 1)),  # rotate 180 degrees: -> bottom-right
    ],
)
def test_exif_orientation_is_applied(orientation: int, corner: tuple[int, int]) -> None:
    stored = np.zeros((32, 64), dtype=np.uint8)  # 64 wide, 32 high
    stored[:16, :16] = 255  # marked top-left block (16 x 16: whole JPEG blocks, survives compression)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    image = decode(data, "rotated.jpg")
    expected_shape = (64, 32) if orientation in (6, 8) else (32, 64)
    array = np.asarray(image)
    assert array.shape == expected_shape
    height, width = array.shape
    row, col = corner
    block = array[row * (height - 16) : row * (height - 16) + 16, col * (width - 16) : col * (width - 16) + 16]
    assert block.mean() > 240
    assert array.sum() < block.sum() * 1.05  # nothing bright elsewhere


def test_corrupt_exif_counts_as_no_orientation() -> None:
    data = encode(Image.new("L", (8, 4), 7), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    image = decode(data)
    assert image.size == (8, 4)


# --- colour models, palettes, alpha ------------------------------------------------------------------------------


def test_cmyk_jpeg_converts_to_rgb() -> None:
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, :16] = (255, 0, 0, 0)  # pure cyan -> (0, 255, 255)
    cmyk[:, 16:] = (0, 0, 0, 128)  # half black: (255 - 0) * (255 - 128) / 255 = 127
    data = encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode(data, "cmyk.jpg")
    assert image.mode == "RGB"
    array = np.asarray(image).astype(int)
    assert np.abs(array[8, 4] - (0, 255, 255)).max() <= 3
    assert np.abs(array[8, 28] - (127, 127, 127)).max() <= 3


def palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.putdata([0, 1, 2])
    return image


def test_palette_with_transparent_index_composites_onto_black() -> None:
    image = decode(encode(palette_image(), "PNG", transparency=1), "p.png")
    assert image.mode == "RGB" and values(image) == [[255, 0, 0], [0, 0, 0], [0, 0, 255]]
    # luma, ITU-R 601-2: red 0.299 * 255 = 76; blue 0.114 * 255 = 29
    assert gray_pixels(image, (1, 3)) == [76, 0, 29]


def test_palette_with_alpha_table_composites_onto_black() -> None:
    # alpha per entry: red opaque, green 128 (255 * 128 / 255 = 128), blue fully transparent
    image = decode(encode(palette_image(), "PNG", transparency=bytes([255, 128, 0])), "p.png")
    assert values(image) == [[255, 0, 0], [0, 128, 0], [0, 0, 0]]


def test_palette_without_transparency_is_rgb() -> None:
    image = decode(encode(palette_image(), "PNG"), "p.png")
    assert image.mode == "RGB" and values(image) == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_la_png_composites_onto_black() -> None:
    la = np.array([[[200, 0], [200, 128], [200, 255]]], dtype=np.uint8)
    data = encode(Image.fromarray(la, mode="LA"), "PNG")
    image = decode(data, "la.png")
    # 200 * alpha / 255: alpha 0 -> 0, 128 -> 100 (100.4), 255 -> 200
    assert image.mode == "L" and values(image) == [0, 100, 200]
    assert gray_pixels(image, (1, 3)) == [0, 100, 200]


def test_rgba_png_composites_onto_black() -> None:
    rgba = np.array([[[200, 100, 50, 0], [200, 100, 50, 128], [200, 100, 50, 255]]], dtype=np.uint8)
    image = decode(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), "rgba.png")
    assert image.mode == "RGB" and values(image) == [[0, 0, 0], [100, 50, 25], [200, 100, 50]]


def test_transparency_entries_of_gray_and_rgb_pngs_composite_onto_black() -> None:
    gray = encode(Image.fromarray(np.array([[10, 20]], dtype=np.uint8)), "PNG", transparency=20)
    assert values(decode(gray)) == [10, 0]
    rgb = Image.new("RGB", (2, 1), (5, 6, 7))
    rgb.putpixel((1, 0), (9, 9, 9))
    assert values(decode(encode(rgb, "PNG", transparency=(9, 9, 9)))) == [[5, 6, 7], [0, 0, 0]]
    wide = encode(Image.fromarray(np.array([[25700, 65535]], dtype=np.uint16)), "PNG", transparency=65535)
    assert values(decode(wide)) == [100, 0]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_their_first_frame(fmt: str) -> None:
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    options: dict[str, Any] = {"save_all": True, "append_images": [blue], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        options["lossless"] = True
    data = encode(red, fmt, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    image = decode(data, f"animated.{fmt.lower()}")
    assert image.mode == "RGB" and image.getpixel((2, 2)) == (255, 0, 0)


def test_one_bit_png_converts_to_0_and_255() -> None:
    data = encode(Image.fromarray(np.array([[0, 1, 1, 0]], dtype=bool)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "1"
    image = decode(data)
    assert image.mode == "L" and values(image) == [0, 255, 255, 0]


def test_l_and_rgb_images_are_not_copied() -> None:
    gray = Image.new("L", (3, 3), 5)
    assert to_8bit(gray) is gray


# --- refusals -----------------------------------------------------------------------------------------------------


def good_png() -> bytes:
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)), "PNG")


def good_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "JPEG")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("empty.png", b""),
        ("text.png", b"this is not an image\n" * 10),
        ("png-signature-only.png", good_png()[:8]),
        ("truncated-header.png", good_png()[:20]),
        ("truncated.png", good_png()[: len(good_png()) // 2]),
        ("truncated.jpg", good_jpeg()[: len(good_jpeg()) // 2]),
        ("jpeg-soi-only.jpg", b"\xff\xd8\xff"),
        ("zero-width.png", raw_png(0, 5, 8, 0)),
        ("bad-idat.png", raw_png(4, 4, 8, 0)[:-24] + png_chunk(b"IDAT", b"not zlib") + png_chunk(b"IEND", b"")),
    ],
)
def test_undecodable_images_are_422_naming_their_source(name: str, data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode(data, name)
    assert info.value.detail.startswith(f"{name}: cannot decode image")
    assert "0x" not in info.value.detail  # no object address of Pillow's BytesIO repr


def test_empty_file_says_so() -> None:
    with pytest.raises(ImageDecodeError, match=r"instances\[3\]: cannot decode image: empty file"):
        decode(b"", "instances[3]")


def test_decompression_bomb_is_413_from_the_header() -> None:
    bomb = raw_png(100_000, 100_000, 8, 0)  # 10^10 pixels announced in a ~60-byte file
    assert len(bomb) < 100
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: .*the limit is 25000000 pixels"):
        open_image(RawImage(bomb, "bomb.png"), LIMIT)
    # over the service's limit but under Pillow's own: refused by open_image's header check, nothing decoded
    with pytest.raises(ImageTooLargeError, match=r"6000x5000 = 30000000 pixels exceeds the limit of 25000000"):
        open_image(RawImage(raw_png(6000, 5000, 8, 0), "big.png"), LIMIT)


def test_a_plugin_failing_with_any_exception_is_422(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = RawImage(good_png(), "odd.png")
    image = open_image(raw, LIMIT)

    def explode() -> None:
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(image, "load", explode)
    with pytest.raises(ImageDecodeError, match=r"odd\.png: cannot decode image: unpack requires"):
        load_image(image, raw)


def test_truncated_images_are_never_loaded_once_the_service_is_imported() -> None:
    import service.app  # noqa: F401  (everything the server imports)
    import service.demo  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
