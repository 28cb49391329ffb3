"""The build file and target profiles as typed, validated models.

Unknown keys are refused with the key, the file and the allowed keys (plus the closest valid
name); every other error names the file, the field path, the bad value and what is allowed.
Relative paths in the build file resolve against the build file's folder.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from .config_base import MAX_SIDE, Float, Int, Strict as _Strict, known_source
from .config_compress import (  # noqa: F401 - the compress section, importable from here
    CompressConfig, DistillConfig, PruneConfig, QATConfig, QuantizeConfig, SearchConfig)
from .config_errors import format_validation_error  # noqa: F401 - profiles.py formats profile errors with it
from .errors import closest
from .loaders import read_yaml as _read_yaml  # noqa: F401 - profiles.py reads profiles with it


MIN_STD = 1e-3
MAX_BATCH = 4096  # the exporter's largest dynamic batch, too
MAX_INPUT_BYTES = 512 << 20  # one model input (batch x channels x height x width float32)
MIN_OPSET = 14  # the ONNX exporter turns a lower opset into 18 without saying so


OPSET_KNOWN = 21  # the newest opset of onnx 1.16, the oldest onnx pyproject.toml allows


@functools.lru_cache(maxsize=1)
def max_opset() -> int:
    """The newest ONNX opset the installed onnx knows (the exporter silently writes 18 above it)."""
    try:
        import onnx.defs

        return int(onnx.defs.onnx_opset_version())
    except ImportError:  # pragma: no cover - onnx is a dependency
        return 18


# ----------------------------------------------------------------------------------------------
# Build file
# ----------------------------------------------------------------------------------------------


class BackboneConfig(_Strict):
    source: str = Field(description="python:FILE.py:FUNC | python:pkg.mod:FUNC | hf:ID_OR_DIR | timm:NAME | torchvision:NAME")
    weights: Optional[str] = None
    pretrained: Optional[bool] = Field(None, description="the provider's own pretrained weights from its cache (timm, torchvision, hf)")
    classifier: Optional[str] = None

    @model_validator(mode="after")
    def _pretrained(self) -> "BackboneConfig":
        if self.pretrained and self.source.startswith("python:"):
            raise ValueError("pretrained: true needs a timm:, torchvision: or hf: source; a python: factory's weights come from backbone.weights")
        if self.pretrained and self.weights:
            raise ValueError("give either pretrained: true (the provider's own weights) or weights: FILE, not both")
        return self

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        return known_source(v)


class DataConfig(_Strict):
    train: str = Field(description="image folder (one sub-folder per class) or list file (.csv 'path,label' / .jsonl)")
    val: Optional[str] = None
    test: Optional[str] = Field(None, description="held out: never used for selection or calibration; reported and gated")
    val_split: Optional[Float] = Field(None, gt=0, lt=1, description="fraction of train held out as val (seeded, stratified) when val is not given")
    workers: Int = Field(0, ge=0, le=256, description="image-decoding processes; 0 = one per CPU core (at most 8)")

    @model_validator(mode="after")
    def _val_source(self) -> "DataConfig":
        if self.val is not None and self.val_split is not None:
            raise ValueError("give either 'val' or 'val_split', not both")
        if self.val is None and self.val_split is None:
            raise ValueError("'val' (a folder or list file) or 'val_split' (e.g. 0.2) is required")
        return self


class PreprocessConfig(_Strict):
    input_size: tuple[Int, Int] = Field(description="height, width")
    color: Literal["rgb", "bgr", "grayscale"] = "rgb"
    resize: Literal["stretch", "letterbox", "center-crop"] = "stretch"
    mean: list[Float] = Field(default_factory=lambda: [0.0])
    std: list[Float] = Field(default_factory=lambda: [1.0])

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= s <= MAX_SIDE for s in v):
            raise ValueError(f"height and width must be between 1 and {MAX_SIDE}")
        return v

    @field_validator("std")
    @classmethod
    def _std(cls, v: list[float]) -> list[float]:
        # pixels are scaled to [0, 1] first: a std under 1e-3 (1e-300 underflows float32 to 0)
        # only turns images into inf/NaN, found late in training with an unrelated message
        if any(not (MIN_STD <= s <= 1000) for s in v):
            raise ValueError(f"every std must be between {MIN_STD} and 1000 (pixels are scaled to 0..1 first)")
        return v

    @field_validator("mean")
    @classmethod
    def _mean(cls, v: list[float]) -> list[float]:
        if any(abs(m) > 1000 for m in v):
            raise ValueError("every mean must be between -1000 and 1000 (pixels are scaled to 0..1 first)")
        return v

    @property
    def channels(self) -> int:
        return 1 if self.color == "grayscale" else 3

    @model_validator(mode="after")
    def _lengths(self) -> "PreprocessConfig":
        for key in ("mean", "std"):
            n = len(getattr(self, key))
            if n not in (1, self.channels):
                raise ValueError(f"{key} has {n} values; color '{self.color}' needs 1 or {self.channels}")
        return self


class AugmentConfig(_Strict):
    """Training-batch augmentation (never val, test, calibration or self-test)."""
    crop_scale: tuple[Float, Float] = Field((0.6, 1.0), description="random-resized-crop: area range of the crop; [1, 1] = no crop")
    hflip: bool = Field(True, description="random horizontal flip")
    color_jitter: Float = Field(0.1, ge=0, le=1, description="brightness/contrast/saturation strength; 0 = off")

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("need 0 < low <= high <= 1")
        return v


DEFAULT_LR = {"sgd": 0.01, "adamw": 0.001}


class TransferConfig(_Strict):
    mode: Literal["finetune", "features", "scratch"] = "finetune"
    epochs: Int = Field(10, ge=0, le=10000)
    warmup_epochs: Int = Field(0, ge=0, le=10000, description="head-only epochs before fine-tuning all weights")
    batch_size: Int = Field(64, ge=1, le=65536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Optional[Float] = Field(None, gt=0, le=10, description="default per optimizer: sgd 0.01, adamw 0.001")
    weight_decay: Float = Field(0.0, ge=0, le=1)
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    patience: Optional[Int] = Field(None, ge=1, le=10000, description="stop after this many epochs without a better val accuracy")
    augment: Union[bool, AugmentConfig, None] = Field(None, description="default: on for finetune and scratch, off for features")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def effective_augment(self) -> Optional[AugmentConfig]:
        """The augmentation training batches get, or None."""
        a = self.augment
        if a is None:
            a = self.mode != "features"
        if a is True:
            return AugmentConfig()
        return a or None


class Budgets(_Strict):
    max_latency_ms: Optional[Float] = Field(None, gt=0, description="p90 latency on the target runtime")
    max_size_mb: Optional[Float] = Field(None, gt=0)
    max_accuracy_drop: Optional[Float] = Field(None, ge=0, le=1)
    min_accuracy: Optional[Float] = Field(None, ge=0, le=1, description="absolute accuracy the artifact must reach (val, and test when given)")
    min_agreement: Optional[Float] = Field(None, ge=0, le=1, description="top-1 agreement with the reference")


class BuildConfig(_Strict):
    name: str = Field(min_length=1, max_length=100)
    version: str = Field("0.1.0", min_length=1, max_length=100)
    seed: Int = Field(0, ge=0, le=2**32 - 1)
    backbone: BackboneConfig
    data: DataConfig
    preprocess: PreprocessConfig
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    targets: list[str] = Field(default_factory=lambda: ["x86-onnxruntime-fp32"], min_length=1)
    budgets: Budgets = Field(default_factory=Budgets)

    # set by the loader, not by the user
    path: Optional[Path] = Field(None, exclude=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names folders and archives)")
        return v

    @property
    def root(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def at_input_size(self, size) -> "BuildConfig":
        """This build file with another preprocess.input_size (a target the search gave a smaller one)."""
        size = (int(size[0]), int(size[1]))
        if size == tuple(self.preprocess.input_size):
            return self
        out = self.model_copy(update={"preprocess": self.preprocess.model_copy(update={"input_size": size})})
        out.path = self.path
        return out

    def resolve(self, p: str | None) -> Path | None:
        if p is None:
            return None
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (self.root / q)


# ----------------------------------------------------------------------------------------------
# Target profiles
# ----------------------------------------------------------------------------------------------


class QuantizationScheme(_Strict):
    method: Literal["static", "qat"] = Field("static", description="static: post-training; qat: quantization-aware training (NNCF)")
    format: Literal["qdq"] = "qdq"
    per_channel: bool = True
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    preset: Literal["performance", "mixed"] = "performance"
    max_reverted: Float = Field(0.25, ge=0, le=1, description="an int8 attempt may give at most this share of the quantizers back to "
                                "float (NNCF accuracy control on OpenVINO); beyond it the file is not really int8 and the guard moves on")


# each runtime's artifact formats and precisions (the runtime adapters in edgebuild.runtimes
# implement them; optional runtimes need their pip extra, checked when a build plans)
RUNTIME_FORMATS = {"onnxruntime": ("onnx", "ort"), "openvino": ("openvino",), "litert": ("tflite",), "executorch": ("pte",),
                   "coreml": ("mlpackage",)}
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "fp16", "int8"), "litert": ("fp32", "int8"),
                      "executorch": ("fp32", "int8"), "coreml": ("fp32", "fp16", "int8")}


class TargetProfile(_Strict):
    name: str
    description: str = ""
    extends: Optional[str] = None
    runtime: Literal["onnxruntime", "openvino", "litert", "executorch", "coreml"]
    device: str = "CPU"
    arch: Literal["x86_64", "aarch64", "armv7l", "any"] = "x86_64"
    platform: Literal["linux", "android", "ios"] = Field("linux", description="the device's OS: android/ios bundles carry a Kotlin/Swift snippet")
    format: Literal["onnx", "openvino", "ort", "tflite", "pte", "mlpackage"] = "onnx"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    opset: Int = Field(18, ge=MIN_OPSET, le=99)
    batch: Union[Int, Literal["dynamic"]] = 1
    threads: Int = Field(0, ge=0, le=1024, description="0 = runtime default")
    align: Int = Field(8, ge=1, le=256, description="pruned channel counts are rounded to multiples of this")
    quantization: QuantizationScheme = Field(default_factory=QuantizationScheme)
    fallback: Literal["fp16", "fp32", "fail"] = "fail"
    budgets: Budgets = Field(default_factory=Budgets)
    hard_budgets: list[str] = Field(default_factory=list, description="budget keys that are device limits: a build file may tighten them, never loosen")

    @field_validator("hard_budgets")
    @classmethod
    def _hard(cls, v: list[str]) -> list[str]:
        for k in v:
            if k not in Budgets.model_fields:
                best = closest(k, Budgets.model_fields)
                raise ValueError(f"'{k}' is not a budget" + (f" (did you mean '{best}'?)" if best else "") + f"; budgets: {', '.join(Budgets.model_fields)}")
        return v

    @field_validator("batch")
    @classmethod
    def _batch(cls, v: Union[int, str]) -> Union[int, str]:
        if isinstance(v, int) and not 1 <= v <= MAX_BATCH:
            raise ValueError(f"batch must be between 1 and {MAX_BATCH}, or 'dynamic'")
        return v

    @field_validator("opset")
    @classmethod
    def _opset(cls, v: int) -> int:
        if v <= OPSET_KNOWN:  # every onnx pyproject allows knows it: no need to import onnx (0.3 s)
            return v
        top = max_opset()
        if v > top:
            raise ValueError(f"the installed ONNX exporter writes opsets {MIN_OPSET} to {top}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TargetProfile":
        formats, precisions = RUNTIME_FORMATS[self.runtime], RUNTIME_PRECISIONS[self.runtime]
        if self.format not in formats:
            raise ValueError(f"runtime {self.runtime} needs format: {' or '.join(formats)}")
        if self.precision not in precisions:
            raise ValueError(f"precision {self.precision} is not supported for runtime {self.runtime}; use {' or '.join(precisions)}")
        if self.batch == "dynamic" and self.runtime in ("litert", "executorch", "coreml"):
            raise ValueError(f"runtime {self.runtime} needs a static batch (batch: 1)")
        return self


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_build_config(path: str | os.PathLike) -> BuildConfig:
    data = _read_yaml(Path(os.path.abspath(path)), "build file")  # checked before links are resolved (a loop, a broken link)
    path = Path(path).resolve()
    try:
        cfg = BuildConfig.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(e, path, BuildConfig) from None
    cfg.path = path
    return cfg
