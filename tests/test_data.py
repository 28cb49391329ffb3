"""Image folders and the one preprocessing function."""

import numpy as np
import pytest
from PIL import Image

from edgebuild.config import PreprocessConfig
from edgebuild.data import calibration_indices, check_same_classes, load_arrays, load_image, preprocess_image, scan_folder
from edgebuild.errors import DataError

from conftest import make_images


def cfg(**kw):
    base = dict(input_size=(8, 12), color="rgb", resize="stretch", mean=[0.5], std=[0.25])
    base.update(kw)
    return PreprocessConfig(**base)


def test_scan_sorted_labels(tmp_path):
    make_images(tmp_path, {"zeta": 2, "alpha": 3, "Mid": 1})
    f = scan_folder(tmp_path, "train")
    assert f.classes == ["Mid", "alpha", "zeta"]
    assert len(f) == 6 and f.class_counts() == {"Mid": 1, "alpha": 3, "zeta": 2}


def test_empty_class_folder(tmp_path):
    make_images(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="'b' has no images"):
        scan_folder(tmp_path, "train")


def test_no_class_folders(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_folder(tmp_path, "train")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_folder(tmp_path / "nope", "train")


def test_non_image_file_named(tmp_path):
    make_images(tmp_path, {"a": 2})
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt"):
        scan_folder(tmp_path, "train")


def test_corrupt_image_named(tmp_path):
    make_images(tmp_path, {"a": 2})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    f = scan_folder(tmp_path, "train")
    with pytest.raises(DataError, match="broken.png"):
        load_arrays(f, cfg())


def test_train_val_classes_must_match(tmp_path):
    make_images(tmp_path / "t", {"a": 1, "b": 1})
    make_images(tmp_path / "v", {"a": 1, "c": 1})
    with pytest.raises(DataError, match="only in train: b; only in val: c"):
        check_same_classes(scan_folder(tmp_path / "t", "train"), scan_folder(tmp_path / "v", "val"))


@pytest.mark.parametrize("color,channels", [("rgb", 3), ("bgr", 3), ("grayscale", 1)])
@pytest.mark.parametrize("resize", ["stretch", "letterbox", "center-crop"])
def test_preprocess_shapes_and_normalisation(color, channels, resize):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (21, 33, 3), dtype=np.uint8), "RGB")
    c = cfg(color=color, resize=resize, mean=[0.5] * channels, std=[0.25] * channels)
    x = preprocess_image(img, c)
    assert x.shape == (channels, 8, 12) and x.dtype == np.float32
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-6 and x.max() <= (1 - 0.5) / 0.25 + 1e-6


def test_bgr_is_rgb_reversed():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 10, 3), dtype=np.uint8), "RGB")
    rgb = preprocess_image(img, cfg(input_size=(10, 10)))
    bgr = preprocess_image(img, cfg(input_size=(10, 10), color="bgr"))
    np.testing.assert_array_equal(rgb[::-1], bgr)


def test_letterbox_pads_and_keeps_aspect():
    img = Image.new("L", (40, 10), 255)
    x = preprocess_image(img, cfg(input_size=(20, 20), color="grayscale", resize="letterbox", mean=[0], std=[1]))
    assert x[0, 0, 10] == 0 and x[0, 10, 10] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "LA", "CMYK", "1"])
def test_any_pillow_mode_decodes(tmp_path, mode):
    arr = np.random.default_rng(2).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "I;16":
        img = Image.fromarray((arr[:, :, 0].astype("<u2") * 257))
    else:
        img = img.convert(mode)
    p = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(p)
    for color in ("rgb", "grayscale"):
        x = load_image(p, cfg(color=color, mean=[0], std=[1]))
        assert np.isfinite(x).all() and 0 <= x.min() and x.max() <= 1


def test_16bit_scaled_not_clipped(tmp_path):
    # 32768 scales to round(32768 / 65535 * 255) = 128; clipping would give 255
    Image.fromarray(np.full((4, 4), 32768, "<u2")).save(tmp_path / "w.png")
    x = load_image(tmp_path / "w.png", cfg(color="grayscale", input_size=(4, 4), mean=[0], std=[1]))
    assert np.all(x == np.float32(128) / np.float32(255))


def test_calibration_subset_is_seeded_and_balanced():
    targets = [0] * 50 + [1] * 30 + [2] * 20
    a = calibration_indices(targets, 30, seed=3)
    b = calibration_indices(targets, 30, seed=3)
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(np.asarray(targets)[a])
    assert counts.tolist() == [10, 10, 10]
    with pytest.warns(UserWarning, match="fewer than"):
        calibration_indices(targets, 30, seed=3)


def test_one_class_is_refused(tmp_path):
    make_images(tmp_path / "t", {"only": 2})
    make_images(tmp_path / "v", {"only": 1})
    with pytest.raises(DataError, match="at least two"):
        check_same_classes(scan_folder(tmp_path / "t", "train"), scan_folder(tmp_path / "v", "val"))
