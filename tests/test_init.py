"""edgebuild init: a commented build file from a data folder, then build; build without a build
file says how to start; --dry-run plans only."""

import json

import pytest
import yaml

from conftest import make_images

from edgebuild.config import TransferConfig


@pytest.fixture
def photos(tmp_path):
    """RGB images, 48x36 (not square), in train/ and val/ (and test/) folders of classes."""
    d = tmp_path / "proj" / "data"
    for split, n, seed in (("train", 10, 1), ("val", 4, 2), ("test", 3, 3)):
        make_images(d / split, {"cat": n, "dog": n, "fox": n}, size=(48, 36), mode="RGB", seed=seed)
    # make the images truly colour: tint the red channel of one class
    from PIL import Image
    for f in (d / "train" / "cat").glob("*.png"):
        im = Image.open(f).convert("RGB")
        r, g, b = im.split()
        Image.merge("RGB", (r.point(lambda v: min(255, v + 80)), g, b)).save(f)
    return tmp_path / "proj"


def test_init_writes_a_commented_build_file_from_the_data(photos, cli):
    code, out, err = cli("init", photos, "--target", "x86-onnxruntime-fp32")
    assert code == 0, err
    text = (photos / "edgebuild.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert "# classes found (3, folder names are the labels): cat (10), dog (10), fox (10)" in text
    assert cfg["data"]["train"] == "data/train" and cfg["data"]["val"] == "data/val"
    assert cfg["preprocess"]["color"] == "rgb" and len(cfg["preprocess"]["mean"]) == 3
    assert cfg["preprocess"]["input_size"] == [64, 64]  # median short side 36 -> the next size up
    assert cfg["preprocess"]["resize"] == "center-crop"  # 4:3 images
    assert cfg["targets"] == ["x86-onnxruntime-fp32"]
    # every training default written out, as the schema has it
    for key, f in TransferConfig.model_fields.items():
        if f.default is not None and key != "mode":
            assert cfg["transfer"][key] == f.default, key
    assert cfg["transfer"]["mode"] == "scratch"  # no weights: nothing to fine-tune
    assert cfg["backbone"]["source"] == "python:edgebuild.models:small_cnn"
    assert "wrote" in out and "edgebuild build" in out


def test_init_refuses_to_overwrite(photos, cli):
    (photos / "edgebuild.yaml").write_text("mine\n")
    code, _, err = cli("init", photos)
    assert code == 2 and "already exists" in err and "hint:" in err
    assert (photos / "edgebuild.yaml").read_text() == "mine\n"


def test_init_defaults_to_the_targets_this_host_runs(photos, cli):
    from edgebuild.profiles import ProfileRegistry, unavailable_reason

    code, _, err = cli("init", photos)
    assert code == 0, err
    cfg = yaml.safe_load((photos / "edgebuild.yaml").read_text())
    reg = ProfileRegistry()
    assert cfg["targets"] == [n for n in reg.names() if unavailable_reason(reg.get(n)) is None]
    assert "rpi-aarch64-onnxruntime-int8" not in cfg["targets"]


def test_init_grayscale_flat_folder_and_errors(tmp_path, cli):
    flat = make_images(tmp_path / "digits", {"one": 6, "two": 6}, size=(20, 20))
    code, _, err = cli("init", tmp_path / "p", "--data", flat, "--target", "x86-onnxruntime-fp32")
    from edgebuild.config import DataConfig

    if "val_split" in DataConfig.model_fields:
        assert code == 0, err
        cfg = yaml.safe_load((tmp_path / "p" / "edgebuild.yaml").read_text())
        assert cfg["data"]["val_split"] == 0.2 and cfg["preprocess"]["color"] == "grayscale" and cfg["preprocess"]["input_size"] == [32, 32]
    else:
        assert code == 2 and "no val/ folder" in err
    code, _, err = cli("init", tmp_path / "q", "--data", tmp_path / "nope")
    assert code == 2 and "data folder not found" in err
    code, _, err = cli("init", tmp_path / "r", "--data", flat, "--target", "x86-onnxruntim-fp32")
    assert code == 2 and "did you mean 'x86-onnxruntime-fp32'" in err
    code, _, err = cli("init", tmp_path / "s", "--data", flat, "--backbone", "foo:bar")
    assert code == 2 and "unknown provider" in err


def test_build_without_a_build_file_says_how_to_start(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("build")
    assert code == 2 and "no build file" in err and "edgebuild init --data PATH" in err and "Traceback" not in err


def test_verbose_flag_anywhere(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("build", "-v")
    assert code == 2 and "Traceback" in err  # -v after the subcommand shows the traceback too


@pytest.mark.slow
def test_init_then_build_dry_run_then_build(photos, cli, monkeypatch):
    code, _, err = cli("init", photos, "--target", "x86-openvino-fp32", "--target", "x86-openvino-int8")
    assert code == 0, err
    text = (photos / "edgebuild.yaml").read_text().replace("epochs: 10", "epochs: 2")
    (photos / "edgebuild.yaml").write_text(text)
    monkeypatch.chdir(photos)
    code, out, err = cli("build", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert all(not s["cached"] for s in plan)
    assert not (photos / "dist").exists()  # nothing ran
    code, _, err = cli("build", "--dry-run")
    # one export for both OpenVINO targets (same opset, batch and format): listed once
    assert "export [x86-openvino-fp32]" in err and "also for x86-openvino-int8" in err
    assert "export [x86-openvino-int8]" not in err
    code, out, err = cli("build")
    assert code == 0, err
    assert (photos / "dist" / "proj-x86-openvino-int8.tar.gz").is_file()
