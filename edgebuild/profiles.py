"""Target profiles: built-ins, user folders, ``extends:`` inheritance, host capability checks."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from .config import TargetProfile, _read_yaml, format_validation_error
from .errors import ConfigError, did_you_mean
from .resources import targets_dir


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class ProfileRegistry:
    """All profiles visible to a build: built-ins overridden by user folders (later wins)."""

    def __init__(self, user_dirs: Iterable[Path] = ()):
        self.files: dict[str, Path] = {}
        self.origin: dict[str, str] = {}
        for origin, d in [("built-in", targets_dir()), *(("user", Path(u)) for u in user_dirs)]:
            if not d.is_dir():
                continue
            for f in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
                self.files[f.stem] = f
                self.origin[f.stem] = origin

    def names(self) -> list[str]:
        return sorted(self.files)

    def raw(self, name: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
        if name not in self.files:
            raise ConfigError(
                f"unknown target '{name}': {did_you_mean(name, self.names())}",
                hint="run 'edgebuild targets list' to see the profiles, or add targets/NAME.yaml beside the build file",
            )
        if name in _chain:
            raise ConfigError(f"target '{name}': 'extends' forms a cycle: {' -> '.join(_chain + (name,))}", hint="remove one of the 'extends' links")
        path = self.files[name]
        data = _read_yaml(path, "target profile")
        parent = data.get("extends")
        if parent is not None:
            if not isinstance(parent, str):
                raise ConfigError(f"{path}: 'extends' = {parent!r}: must be a profile name", hint="write extends: NAME")
            base = dict(self.raw(parent, _chain + (name,)))
            base.pop("description", None)
            data = _deep_merge(base, data)
        return data

    def get(self, name: str) -> TargetProfile:
        data = self.raw(name)
        data["name"] = name
        try:
            return TargetProfile.model_validate(data)
        except ValidationError as e:
            raise format_validation_error(e, self.files[name], TargetProfile) from None


def check_input_fits(profile: TargetProfile, preprocess, path: Path | None) -> None:
    """One model input (the profile's batch, the build's input size) must fit in memory: a batch
    of 10^9 would otherwise try to allocate terabytes at export."""
    from .config import MAX_INPUT_BYTES

    batch = profile.batch if isinstance(profile.batch, int) else 1
    h, w = preprocess.input_size
    size = batch * preprocess.channels * h * w * 4
    if size > MAX_INPUT_BYTES:
        raise ConfigError(f"{path or profile.name}: target '{profile.name}': one input of batch {batch} x {preprocess.channels} x {h} x {w} "
                          f"float32 is {size / 2**30:.1f} GiB, over the limit of {MAX_INPUT_BYTES / 2**20:.0f} MiB",
                          hint="lower 'batch' in the target profile or 'preprocess.input_size' in the build file")


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def unavailable_reason_memo(profile: TargetProfile, memo: Path) -> str | None:
    """:func:`unavailable_reason`, remembered in ``memo`` (a JSON file in the cache) per profile,
    host, boot and runtime package versions: asking OpenVINO and ONNX Runtime which devices are
    present means importing them (about 1 s), which a fully cached rebuild should not pay. A
    device plugged in without a reboot is seen by ``build --force`` or ``--remeasure``."""
    import hashlib
    import json
    import os
    import socket
    from importlib import metadata

    from .runtimes import adapter

    boot = _boot_id()
    if boot is None:
        return unavailable_reason(profile)
    versions = {}
    for pkg in adapter(profile.runtime).packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    key = hashlib.sha256(json.dumps([profile.model_dump(mode="json"), versions, boot, socket.gethostname()], sort_keys=True).encode()).hexdigest()[:24]
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and key in known:
        return known[key]
    reason = unavailable_reason(profile)
    known = known if isinstance(known, dict) else {}
    known[key] = reason
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache: probe every time
    return reason


def unavailable_reason(profile: TargetProfile) -> str | None:
    """Why this profile cannot be validated on this host, or None when it can."""
    from .runtimes import adapter

    rt = adapter(profile.runtime)
    missing = rt.missing()
    if missing:
        return missing
    platform_reason = rt.platform_reason(profile)
    if platform_reason:
        return platform_reason
    if profile.arch not in ("any", host_arch()):
        return f"target arch {profile.arch} is not this host's ({host_arch()})"
    return rt.host_reason(profile)


def refuse_missing_extras(profiles: dict[str, TargetProfile]) -> None:
    """Exit 2 before any work when a target's runtime needs a pip extra this install lacks."""
    from .errors import RuntimeMissing
    from .runtimes import adapter

    for name, prof in profiles.items():
        rt = adapter(prof.runtime)
        why = rt.missing() if rt.extra else None
        if why:
            raise RuntimeMissing(f"target '{name}' needs the '{rt.extra}' extra, which is not installed ({why})",
                                 hint=f"pip install 'edgebuild[{rt.extra}]' (with -c constraints.txt in a checkout), or drop the target")


def ort_provider(device: str) -> str:
    if device.endswith("ExecutionProvider"):
        return device
    return {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "GPU": "CUDAExecutionProvider"}.get(device.upper(), f"{device}ExecutionProvider")
