"""Image folders and the one preprocessing function."""

import numpy as np
import pytest
from PIL import Image

from edgebuild.config import PreprocessConfig
from edgebuild.data import calibration_indices, check_same_classes, load_image, preprocess_image, scan_folder
from edgebuild import store
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
        store.build(f, tmp_path / "store", (8, 12), "rgb", "stretch")
    assert not (tmp_path / "store").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


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


# ------------------------------------------------------------------------------ the image store
def _split(tmp_path, n=40, mode="RGB", size=(19, 23)):
    make_images(tmp_path / "imgs", {"a": n // 2, "b": n - n // 2}, size=size, mode=mode)
    return scan_folder(tmp_path / "imgs", "train")


@pytest.mark.parametrize("color", ["rgb", "bgr", "grayscale"])
@pytest.mark.parametrize("resize", ["stretch", "letterbox", "center-crop"])
def test_store_batches_are_bit_identical_to_preprocess(tmp_path, color, resize):
    split = _split(tmp_path, n=10)
    c = cfg(color=color, resize=resize, mean=[0.4] * (1 if color == "grayscale" else 3), std=[0.3] * (1 if color == "grayscale" else 3))
    s = store.open_or_build(tmp_path / "data", "k", split, c.input_size, c.color, c.resize, workers=1)
    X = store.ImageArray(split, lambda: s, c.input_size, c.color, c.resize, c.mean, c.std)
    ref = np.stack([load_image(f, c) for f in split.files])
    got = X[np.arange(len(split))]
    assert got.dtype == np.float32 and got.tobytes() == ref.tobytes()
    assert X[[7, 2, 3]].tobytes() == ref[[7, 2, 3]].tobytes() and X[4].tobytes() == ref[4].tobytes()


def test_store_parallel_workers_equal_single_process(tmp_path, monkeypatch):
    split = _split(tmp_path, n=48)
    monkeypatch.setattr(store, "POOL_MIN_IMAGES", 8)
    monkeypatch.setattr(store, "CHUNK", 5)
    seen = []
    a = store.open_or_build(tmp_path / "d1", "k", split, (8, 12), "rgb", "stretch", workers=2)
    b = store.build(split, tmp_path / "d2" / "k", (8, 12), "rgb", "stretch", workers=1, progress=lambda n, info: seen.append(info))
    assert (a.folder / "images.npy").read_bytes() == (b / "images.npy").read_bytes()
    assert "images/s" in seen[-1] and "ETA" in seen[-1]


def test_store_is_reused_not_redecoded(tmp_path):
    split = _split(tmp_path, n=6)
    s1 = store.open_or_build(tmp_path / "data", "k", split, (8, 12), "rgb", "stretch", workers=1)
    stamp = (s1.folder / "images.npy").stat().st_mtime_ns
    for f in split.files:  # the files are gone: a reused store never reads them
        f.unlink()
    s2 = store.open_or_build(tmp_path / "data", "k", split, (8, 12), "rgb", "stretch", workers=1)
    assert (s2.folder / "images.npy").stat().st_mtime_ns == stamp and s2.rows(np.arange(6)).shape == (6, 8, 12, 3)


def test_truncated_store_is_rebuilt(tmp_path):
    split = _split(tmp_path, n=6)
    s1 = store.open_or_build(tmp_path / "data", "k", split, (8, 12), "rgb", "stretch", workers=1)
    good = (s1.folder / "images.npy").read_bytes()
    with open(s1.folder / "images.npy", "r+b") as f:
        f.truncate(len(good) - 10)
    s2 = store.open_or_build(tmp_path / "data", "k", split, (8, 12), "rgb", "stretch", workers=1)
    assert (s2.folder / "images.npy").read_bytes() == good


def test_store_reads_do_not_grow_memory(tmp_path):
    """Reading every row of a store in batches keeps RSS flat (positioned reads, no mapping)."""
    import resource

    split = _split(tmp_path, n=300, size=(64, 64))
    s = store.open_or_build(tmp_path / "data", "k", split, (128, 128), "rgb", "stretch", workers=1)
    X = store.ImageArray(split, lambda: s, (128, 128), "rgb", "stretch", [0.5], [0.25])
    X[:8]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = 0.0
    for b in range(0, len(X), 16):
        total += float(X[b : b + 16].sum())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    whole_mb = len(X) * 3 * 128 * 128 * 4 / 2**20  # the whole split as float32: ~56 MB
    assert grown_mb < whole_mb / 4, (grown_mb, whole_mb)


# ------------------------------------------------------------------------------ list files, val_split, test
from edgebuild.sources import read_list, resolve  # noqa: E402


def _list_project(tmp_path):
    make_images(tmp_path / "imgs", {"cat": 6, "dog": 6}, size=(10, 10))
    rows = [(f"imgs/{c}/img{i:03d}.png", c) for c in ("cat", "dog") for i in range(6)]
    return rows


def test_csv_and_jsonl_lists(tmp_path):
    import json

    rows = _list_project(tmp_path)
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train.jsonl").write_text("".join(json.dumps({"path": "../" + p, "label": label}) + "\n" for p, label in rows))
    a = read_list(tmp_path / "train.csv", "train")
    b = read_list(tmp_path / "sub" / "train.jsonl", "train")
    assert a.classes == b.classes == ["cat", "dog"] and a.targets == b.targets == [0] * 6 + [1] * 6
    assert [f.resolve() for f in a.files] == [f.resolve() for f in b.files]


@pytest.mark.parametrize("text,match", [
    ("path,labels\nimgs/cat/img000.png,cat\n", r"train.csv:1: expected the header row 'path,label'"),
    ("path,label\nimgs/cat/img000.png,cat\nimgs/cat/img001.png\n", r"train.csv:3: expected 2 fields"),
    ("path,label\nimgs/cat/img000.png,cat\nimgs/cat/nope.png,cat\n", r"train.csv:3: image not found"),
    ("path,label\nimgs/cat/img000.png,\n", r"train.csv:2: empty label"),
    ("path,label\n", r"train.csv: the list has no rows"),
])
def test_malformed_csv_names_file_and_line(tmp_path, text, match):
    _list_project(tmp_path)
    (tmp_path / "train.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        read_list(tmp_path / "train.csv", "train")


@pytest.mark.parametrize("line,match", [
    ("{not json", r"train.jsonl:2: not a JSON object"),
    ('{"path": "imgs/cat/img001.png"}', r"train.jsonl:2: expected"),
    ('{"path": "imgs/cat/img001.png", "label": true}', r"train.jsonl:2: expected"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, match):
    _list_project(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"path": "imgs/cat/img000.png", "label": "cat"}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        read_list(tmp_path / "train.jsonl", "train")


def test_list_refuses_fifo_and_non_images(tmp_path):
    import os

    _list_project(tmp_path)
    os.mkfifo(tmp_path / "imgs" / "pipe.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a.csv").write_text("path,label\nimgs/pipe.png,cat\n")
    with pytest.raises(DataError, match=r"a.csv:2: .*not a regular file \(a fifo\)"):
        read_list(tmp_path / "a.csv", "train")
    (tmp_path / "b.csv").write_text("path,label\nnotes.txt,cat\n")
    with pytest.raises(DataError, match=r"b.csv:2: not an image file"):
        read_list(tmp_path / "b.csv", "train")


def test_unknown_label_in_val_names_line(tmp_path):
    rows = _list_project(tmp_path)
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    (tmp_path / "val.csv").write_text(f"path,label\n{rows[0][0]},cat\n{rows[1][0]},bird\n")
    with pytest.raises(DataError, match=r"val.csv:3: unknown label 'bird' in val"):
        resolve(tmp_path / "train.csv", tmp_path / "val.csv", None, None, 0)
    (tmp_path / "test.csv").write_text(f"path,label\n{rows[0][0]},fish\n")
    with pytest.raises(DataError, match=r"test.csv:2: unknown label 'fish' in test"):
        resolve(tmp_path / "train.csv", None, tmp_path / "test.csv", 0.25, 0)


def test_corrupt_image_in_list_names_line(tmp_path):
    rows = _list_project(tmp_path)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (tmp_path / "train.csv").write_text("path,label\n" + f"{rows[0][0]},cat\nimgs/bad.png,dog\n")
    split = read_list(tmp_path / "train.csv", "train")
    with pytest.raises(DataError, match=r"train.csv:3: .*bad.png: .*(corrupt|not an image)"):
        store.build(split, tmp_path / "s", (8, 8), "rgb", "stretch", workers=1)


def test_val_split_is_seeded_stratified_and_recorded(tmp_path):
    make_images(tmp_path / "t", {"a": 10, "b": 20, "c": 5}, size=(8, 8))
    s1 = resolve(tmp_path / "t", None, None, 0.2, seed=3)
    s2 = resolve(tmp_path / "t", None, None, 0.2, seed=3)
    s3 = resolve(tmp_path / "t", None, None, 0.2, seed=4)
    assert s1.val.files == s2.val.files and s1.val.files != s3.val.files
    assert s1.val.class_counts() == {"a": 2, "b": 4, "c": 1} and len(s1.train) == 28
    assert not set(s1.val.files) & set(s1.train.files)
    rec = s1.record["val_split"]
    assert rec["fraction"] == 0.2 and rec["seed"] == 3 and rec["val_images"] == 7 and len(rec["val_files_sha256"]) == 64


def test_val_split_needs_two_images_per_class(tmp_path):
    make_images(tmp_path / "t", {"a": 4, "b": 1}, size=(8, 8))
    with pytest.raises(DataError, match="class 'b' has 1 image"):
        resolve(tmp_path / "t", None, None, 0.2, seed=0)


# ------------------------------------------------------------------------------ end to end
def test_csv_list_with_val_split_and_test_builds(tiny_project, cli):
    """A CSV list with val_split builds; the split is in the manifest; test is reported and gated."""
    import json

    lines = ["path,label"]
    for c in ("a", "b", "c"):
        lines += [f"data/train/{c}/{p.name},{c}" for p in sorted((tiny_project / "data" / "train" / c).iterdir())]
    (tiny_project / "train.csv").write_text("\n".join(lines) + "\n")
    test = "".join(json.dumps({"path": f"val/{c}/{p.name}", "label": c}) + "\n"
                   for c in ("a", "b", "c") for p in sorted((tiny_project / "data" / "val" / c).iterdir()))
    (tiny_project / "data" / "test.jsonl").write_text(test)
    text = (tiny_project / "edgebuild.yaml").read_text().replace("  train: data/train\n  val: data/val\n",
                                                                  "  train: train.csv\n  val_split: 0.25\n  test: data/test.jsonl\n")
    (tiny_project / "edgebuild.yaml").write_text(text + "budgets: {min_accuracy: 0.0}\n")
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "dist")
    assert code == 0, err
    m = json.loads((tiny_project / "dist" / "tiny-x86-onnxruntime-fp32" / "manifest.json").read_text())
    split = m["data"]["val_split"]
    assert split["fraction"] == 0.25 and split["val_images"] == 9 and split["train_images"] == 27
    assert 0 <= m["metrics"]["test_accuracy"] <= 1 and m["transfer"]["test_accuracy"] is not None
    gates = {g["budget"] for g in m["metrics"]["gates"]}
    assert {"min_accuracy", "min_accuracy (test)"} <= gates
    # an impossible absolute accuracy fails the build (exit 3), on val and on test
    (tiny_project / "edgebuild.yaml").write_text(text + "budgets: {min_accuracy: 1.0}\n")
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "dist")
    report = json.loads((tiny_project / "dist" / ("failed-report.json" if code == 3 else "report.json")).read_text())  # a failed build reports beside dist/
    failed = {g["budget"] for g in report["targets"]["x86-onnxruntime-fp32"]["gates"] if g["verdict"] == "FAIL"}
    assert code == 3 and "min_accuracy (test)" in failed or report["targets"]["x86-onnxruntime-fp32"]["metrics"]["test_accuracy"] == 1.0


def test_near_chance_model_warns(tiny_project, cli):
    import json

    text = (tiny_project / "edgebuild.yaml").read_text().replace("  lr: 0.05", "  lr: 0.000001\n  augment: false")
    (tiny_project / "edgebuild.yaml").write_text(text.replace("mode: finetune", "mode: scratch"))
    code, out, err = cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "dist")
    report = json.loads((tiny_project / "dist" / "report.json").read_text())
    acc = report["transfer"]["val_accuracy"]
    assert code == 0 and acc <= 1 / 3 + 0.05, acc
    assert report["transfer"]["near_chance"] is True and "of chance" in err and "warning:" in err


def test_rebuild_reuses_store_and_plan_decodes_nothing(tiny_project, cli, monkeypatch):
    from edgebuild import store as store_mod
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build

    import os
    from pathlib import Path

    assert cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "dist")[0] == 0
    stores = sorted(Path(os.environ["EDGEBUILD_CACHE_DIR"]).glob("data/*/images.npy"))
    assert len(stores) == 2  # train and val, decoded once

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(store_mod, "build", boom)
    monkeypatch.setattr(store_mod, "decode_file", boom)
    steps = Build(load_build_config(tiny_project / "edgebuild.yaml")).plan()
    assert all(s.cached for s in steps)
    assert cli("build", tiny_project / "edgebuild.yaml", "-o", tiny_project / "dist")[0] == 0
