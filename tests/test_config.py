"""Config errors name the file, the field path, the bad value and what is allowed; exit 2."""

from pathlib import Path

import pytest

from edgebuild.config import load_build_config
from edgebuild.errors import ConfigError

from conftest import EXAMPLE, write_config


def test_example_loads_and_paths_resolve_against_the_file():
    cfg = load_build_config(EXAMPLE / "edgebuild.yaml")
    assert cfg.name == "digits-5to9"
    assert cfg.resolve(cfg.data.train) == EXAMPLE / "data" / "train"
    assert cfg.resolve(cfg.backbone.weights).is_file()


def error_for(tmp_path, text) -> ConfigError:
    p = tmp_path / "edgebuild.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_build_config(p)
    assert str(p) in ei.value.message
    return ei.value


def test_unknown_key_names_key_allowed_keys_and_closest(tiny_project):
    text = (tiny_project / "edgebuild.yaml").read_text().replace("  epochs: 2", "  epocs: 2")
    err = error_for(tiny_project, text)
    assert "transfer.epocs" in err.message
    assert "did you mean 'epochs'" in err.message
    assert "allowed keys here" in err.message and "batch_size" in err.message


def test_top_level_unknown_key(tiny_project):
    err = error_for(tiny_project, (tiny_project / "edgebuild.yaml").read_text() + "bugdets: {}\n")
    assert "'bugdets'" in err.message and "did you mean 'budgets'" in err.message


def test_wrong_type_shows_value(tiny_project):
    text = (tiny_project / "edgebuild.yaml").read_text().replace("  epochs: 2", "  epochs: many")
    err = error_for(tiny_project, text)
    assert "transfer.epochs" in err.message and "'many'" in err.message


def test_bad_choice_lists_allowed_and_closest(tiny_project):
    text = (tiny_project / "edgebuild.yaml").read_text().replace("mode: finetune", "mode: fintune")
    err = error_for(tiny_project, text)
    assert "transfer.mode" in err.message and "finetune" in err.message and "did you mean 'finetune'" in err.message


def test_misspelled_provider(tiny_project):
    text = (tiny_project / "edgebuild.yaml").read_text().replace("python:backbone.py:build", "pyhton:backbone.py:build")
    err = error_for(tiny_project, text)
    assert "backbone.source" in err.message and "did you mean 'python'" in err.message


def test_out_of_range_value(tiny_project):
    err = error_for(tiny_project, (tiny_project / "edgebuild.yaml").read_text() + "compress:\n  prune: {ratio: 1.5}\n")
    assert "compress.prune.ratio" in err.message and "1.5" in err.message


def test_yaml_syntax_error_has_line_number(tmp_path):
    err = error_for(tmp_path, "name: x\nbackbone: [unclosed\ndata: {}\n")
    assert "line" in err.message and "YAML syntax error" in err.message


def test_empty_file(tmp_path):
    err = error_for(tmp_path, "")
    assert "empty" in err.message


def test_not_a_mapping(tmp_path):
    err = error_for(tmp_path, "- a\n- b\n")
    assert "mapping" in err.message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_build_config(tmp_path / "nope.yaml")


def test_mean_std_length_checked(tiny_project):
    text = (tiny_project / "edgebuild.yaml").read_text().replace("mean: [0.5]", "mean: [0.5, 0.5]")
    err = error_for(tiny_project, text)
    assert "mean" in err.message


def test_unsafe_name_refused(tiny_project):
    text = (tiny_project / "edgebuild.yaml").read_text().replace("name: tiny", "name: ../escape")
    err = error_for(tiny_project, text)
    assert "'name'" in err.message


def test_cli_config_error_is_exit_2_without_traceback(tiny_project, cli):
    text = (tiny_project / "edgebuild.yaml").read_text().replace("  epochs: 2", "  epocs: 2")
    (tiny_project / "edgebuild.yaml").write_text(text)
    code, out, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 2
    assert err.startswith("error: ") and "\nhint: " in err
    assert "Traceback" not in err


def test_cli_misspelled_target_suggests_closest(tiny_project, cli):
    write_config(tiny_project, targets="[x86-onnxruntime-fp23]")
    code, _, err = cli("build", tiny_project / "edgebuild.yaml")
    assert code == 2 and "did you mean 'x86-onnxruntime-fp32'" in err and "Traceback" not in err


def test_cli_unknown_target_flag(tiny_project, cli):
    code, _, err = cli("build", tiny_project / "edgebuild.yaml", "-t", "x86-openvino-int9")
    assert code == 2 and "x86-openvino-int8" in err


@pytest.mark.parametrize("backbone, why", [
    ("{source: 'python:backbone.py:build', pretrained: true}", "needs a timm:, torchvision: or hf: source"),
    ("{source: 'timm:resnet18', pretrained: true, weights: w.safetensors}", "not both"),
])
def test_pretrained_is_checked(tmp_path, backbone, why):
    p = tmp_path / "edgebuild.yaml"
    p.write_text(f"name: t\nbackbone: {backbone}\ndata: {{train: a, val: b}}\npreprocess: {{input_size: [8, 8]}}\n")
    with pytest.raises(ConfigError, match=why):
        load_build_config(p)
