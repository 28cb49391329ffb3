"""Preprocessing against known pixels. Every expected value here is worked out by hand (or with
plain numpy arithmetic written out in the test), never by calling the code under test."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgebuild.config import PreprocessConfig
from edgebuild.data import MAX_PIXELS, load_image, preprocess_image
from edgebuild.errors import DataError


def raw(size, color="grayscale", resize="stretch"):
    """Preprocessing that leaves the 8-bit values visible: mean 0, std 1, so x = pixel / 255."""
    channels = 1 if color == "grayscale" else 3
    return PreprocessConfig(input_size=size, color=color, resize=resize, mean=[0.0] * channels, std=[1.0] * channels)


def as_bytes(x: np.ndarray) -> np.ndarray:
    """float32 pixel/255 back to the 8-bit values (exact for values made by x = p / 255)."""
    return np.rint(x * 255.0).astype(np.int64)


# ------------------------------------------------------------------ 16-bit images are scaled
@pytest.mark.parametrize("value,expected", [(32768, 128), (65535, 255), (257, 1), (0, 0), (16384, 64)])
def test_16bit_values_are_scaled_to_8bit(tmp_path, value, expected):
    """A 16-bit image maps 0..65535 onto 0..255: 32768 -> round(32768 / 65535 * 255) = 128
    (clipping would give 255), 257 -> 1 (clipping: 255), 16384 -> round(63.75) = 64."""
    Image.fromarray(np.full((4, 4), value, "<u2")).save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    x = load_image(tmp_path / "p.png", raw((4, 4)))
    assert as_bytes(x).tolist() == np.full((1, 4, 4), expected).tolist()


def test_16bit_gradient_keeps_its_order(tmp_path):
    values = np.array([[0, 1000, 20000, 32768, 50000, 65535]], "<u2")
    Image.fromarray(values).save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", raw((1, 6)))
    # round(v / 65535 * 255) by hand: 0, 3.89 -> 4, 77.82 -> 78, 127.50 -> 128, 194.55 -> 195, 255
    assert as_bytes(x)[0, 0].tolist() == [0, 4, 78, 128, 195, 255]


# ------------------------------------------------------------------ center-crop takes the centre
def test_center_crop_takes_the_middle_columns():
    """10 wide x 6 high into 6x6: the short side already fits (scale 1), so no resampling;
    the crop starts at (10 - 6) // 2 = 2: columns 2..7."""
    arr = np.tile((np.arange(10) * 20).astype(np.uint8), (6, 1))  # column c has value 20c
    x = preprocess_image(Image.fromarray(arr, "L"), raw((6, 6), resize="center-crop"))
    assert as_bytes(x)[0].tolist() == [[40, 60, 80, 100, 120, 140]] * 6


def test_center_crop_takes_the_middle_rows():
    """5 wide x 9 high into 3 high x 5 wide: scale 1, crop rows (9 - 3) // 2 = 3 .. 5."""
    arr = np.repeat((np.arange(9) * 25).astype(np.uint8)[:, None], 5, axis=1)  # row r has value 25r
    x = preprocess_image(Image.fromarray(arr, "L"), raw((3, 5), resize="center-crop"))
    assert as_bytes(x)[0].tolist() == [[75] * 5, [100] * 5, [125] * 5]


def test_center_crop_after_upscaling():
    """4 wide x 2 high into 4x4: scale max(4/4, 4/2) = 2 -> 8x4, crop columns 2..5. Each 2x
    bilinear pass maps [a, b] to [a, .75a+.25b, .25a+.75b, b] (Pillow's triangle filter at
    centres 0.25, 0.75, ...), so the row [0, 40, 80, 120] becomes
    [0, 10, 30, 50, 70, 90, 110, 120] and the crop keeps [30, 50, 70, 90]; rows are equal."""
    arr = np.tile(np.array([0, 40, 80, 120], np.uint8), (2, 1))
    x = preprocess_image(Image.fromarray(arr, "L"), raw((4, 4), resize="center-crop"))
    assert as_bytes(x)[0].tolist() == [[30, 50, 70, 90]] * 4


# ------------------------------------------------------------------ stretch resamples bilinearly
def _upscale2(v: np.ndarray) -> np.ndarray:
    """One 2x bilinear pass along the last axis, by hand: out[2i] and out[2i+1] sit at source
    positions i - 0.25 and i + 0.25 (clamped at the edges)."""
    n = v.shape[-1]
    out = np.empty(v.shape[:-1] + (2 * n,))
    for i in range(n):
        left, right = v[..., max(i - 1, 0)], v[..., min(i + 1, n - 1)]
        out[..., 2 * i] = v[..., i] if i == 0 else 0.75 * v[..., i] + 0.25 * left
        out[..., 2 * i + 1] = v[..., i] if i == n - 1 else 0.75 * v[..., i] + 0.25 * right
    return np.floor(out + 0.5)  # Pillow rounds the 8-bit result half up


def test_stretch_upscale_matches_hand_bilinear():
    """2x2 -> 4x4: [a, b] -> [a, .75a+.25b, .25a+.75b, b] per axis, width first, 8-bit in
    between. Multiples of 16, so every weighted sum is whole (no rounding ties)."""
    arr = np.array([[0, 160], [32, 96]], np.uint8)
    x = preprocess_image(Image.fromarray(arr, "L"), raw((4, 4)))
    expected = _upscale2(_upscale2(arr.astype(float)).T).T
    assert expected.tolist() == [[0, 40, 120, 160], [8, 42, 110, 144], [24, 46, 90, 112], [32, 48, 80, 96]]
    assert as_bytes(x)[0].tolist() == expected.tolist()


def test_stretch_same_size_is_identity_and_rgb_order_kept():
    rgb = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [200, 210, 220]]], np.uint8)
    x = preprocess_image(Image.fromarray(rgb, "RGB"), raw((2, 2), color="rgb"))
    assert as_bytes(x).tolist() == rgb.transpose(2, 0, 1).tolist()
    xb = preprocess_image(Image.fromarray(rgb, "RGB"), raw((2, 2), color="bgr"))
    assert as_bytes(xb).tolist() == rgb[:, :, ::-1].transpose(2, 0, 1).tolist()


def test_normalisation_arithmetic():
    """(p/255 - mean) / std for p = 51: (0.2 - 0.5) / 0.25 = -1.2; p = 255: 2.0."""
    arr = np.array([[51, 255]], np.uint8)
    x = preprocess_image(Image.fromarray(arr, "L"), PreprocessConfig(input_size=(1, 2), color="grayscale", mean=[0.5], std=[0.25]))
    np.testing.assert_allclose(x[0, 0], [-1.2, 2.0], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ alpha is composited over white
def test_alpha_over_white_rgba():
    """out = a*src + (1-a)*255. alpha 51 (0.2): (0, 100, 255) -> (204, 20+204, 51+204);
    alpha 0 -> white; alpha 255 -> the pixel itself."""
    px = np.array([[[0, 100, 255, 51], [9, 9, 9, 0], [1, 2, 3, 255]]], np.uint8)
    x = preprocess_image(Image.fromarray(px, "RGBA"), raw((1, 3), color="rgb"))
    assert as_bytes(x)[:, 0].T.tolist() == [[204, 224, 255], [255, 255, 255], [1, 2, 3]]


def test_alpha_over_white_la_and_palette(tmp_path):
    la = np.array([[[100, 51], [0, 0]]], np.uint8)  # 0.2*100 + 0.8*255 = 224; transparent -> 255
    x = preprocess_image(Image.fromarray(la, "LA"), raw((1, 2)))
    assert as_bytes(x)[0, 0].tolist() == [224, 255]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "t.png", transparency=0)  # palette entry 0 is transparent
    y = load_image(tmp_path / "t.png", raw((1, 2), color="rgb"))
    assert as_bytes(y)[:, 0].T.tolist() == [[255, 255, 255], [10, 20, 30]]


# ------------------------------------------------------------------ edgebuild's own pixel limit
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grayscale) with a tiny, truncated IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_limit_between_edgebuild_and_pillow(tmp_path):
    """8000 x 7500 = 60 M pixels: over edgebuild's 50 M limit, under Pillow's own (~89 M warns,
    twice that errors), so only edgebuild's check can refuse it."""
    assert MAX_PIXELS == 50_000_000
    assert 8000 * 7500 < Image.MAX_IMAGE_PIXELS  # Pillow alone would try to decode it
    p = tmp_path / "big.png"
    p.write_bytes(png_header_only(8000, 7500))
    assert len(p.read_bytes()) < 200
    with pytest.raises(DataError) as e:
        load_image(p, raw((4, 4)))
    assert "8000x7500 pixels, over the limit of 50000000" in e.value.message
