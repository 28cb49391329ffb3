"""Target profiles: built-ins, extends, user overrides, host checks, CLI."""

import pytest

from edgebuild.errors import ConfigError
from edgebuild.profiles import ProfileRegistry, unavailable_reason


def test_at_least_six_builtins_resolve():
    reg = ProfileRegistry()
    names = reg.names()
    assert len(names) >= 6
    for n in names:
        p = reg.get(n)
        assert p.description, n
        assert p.name == n


def test_extends_inherits_and_overrides():
    reg = ProfileRegistry()
    rpi = reg.get("rpi-aarch64-onnxruntime-int8")
    assert rpi.arch == "aarch64" and rpi.precision == "int8" and rpi.runtime == "onnxruntime" and rpi.threads == 4


def test_absent_arch_and_device_have_reasons():
    reg = ProfileRegistry()
    assert "aarch64" in unavailable_reason(reg.get("rpi-aarch64-onnxruntime-int8"))
    assert "NPU" in unavailable_reason(reg.get("intel-npu-openvino-fp16"))
    assert unavailable_reason(reg.get("x86-onnxruntime-fp32")) is None


def test_user_profile_overrides_builtin(tmp_path):
    (tmp_path / "x86-onnxruntime-fp32.yaml").write_text("extends: x86-openvino-fp32\nthreads: 1\ndescription: mine\n")
    reg = ProfileRegistry([tmp_path])
    p = reg.get("x86-onnxruntime-fp32")
    assert reg.origin["x86-onnxruntime-fp32"] == "user"
    assert p.description == "mine" and p.threads == 1


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b\nruntime: onnxruntime\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ConfigError, match="cycle"):
        ProfileRegistry([tmp_path]).get("a")


def test_profile_unknown_key_names_file(tmp_path):
    (tmp_path / "mine.yaml").write_text("extends: x86-onnxruntime-fp32\nthread: 3\n")
    with pytest.raises(ConfigError) as ei:
        ProfileRegistry([tmp_path]).get("mine")
    assert "mine.yaml" in ei.value.message and "did you mean 'threads'" in ei.value.message


def test_inconsistent_profile_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("runtime: onnxruntime\nformat: openvino\n")
    with pytest.raises(ConfigError, match="format: onnx"):
        ProfileRegistry([tmp_path]).get("bad")


def test_cli_targets_list_and_show(cli):
    code, out, _ = cli("targets", "list")
    assert code == 0 and "x86-openvino-int8" in out and "rpi-aarch64-onnxruntime-int8" in out
    code, out, _ = cli("targets", "show", "rpi-aarch64-onnxruntime-int8")
    assert code == 0 and "arch: aarch64" in out and "runtime: onnxruntime" in out and "precision: int8" in out
    code, _, err = cli("targets", "show", "rpi-aarch64-onnxruntime-int")
    assert code == 2 and "did you mean 'rpi-aarch64-onnxruntime-int8'" in err
