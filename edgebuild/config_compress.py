"""The build file's ``compress`` section: prune, distill, quantize (with QAT) and search.
Imported through edgebuild.config like every other part of the build file."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator

from .config_base import MAX_SIDE, Float, Int, Strict as _Strict, known_source


class PruneConfig(_Strict):
    ratio: Float = Field(0.0, ge=0.0, lt=1.0)
    importance: Literal["l1", "l2", "taylor"] = "l2"
    scope: Literal["global", "uniform"] = "uniform"
    keep: list[str] = Field(default_factory=list, description="module names never pruned (the new head always is)")
    stage_ratios: dict[str, Float] = Field(default_factory=dict, description="per stage: module name -> its own ratio")
    recover_epochs: Optional[Int] = Field(None, ge=0, le=10000, description="default: half the transfer epochs (at least 1)")
    lr: Optional[Float] = Field(None, gt=0, le=10)

    def effective_recover_epochs(self, transfer_epochs: int) -> int:
        """recover_epochs, or half the transfer epochs (at least 1) when not set."""
        return self.recover_epochs if self.recover_epochs is not None else max(1, (transfer_epochs + 1) // 2)


class DistillConfig(_Strict):
    temperature: Float = Field(4.0, gt=0, le=100)
    alpha: Float = Field(0.5, ge=0, le=1)
    student: Optional[str] = Field(None, description="a backbone source: the transferred model teaches this smaller model")
    student_weights: Optional[str] = Field(None, description="the student's own starting weights (default: random init)")
    student_classifier: Optional[str] = None
    epochs: Optional[Int] = Field(None, ge=0, le=10000, description="student training epochs (default: transfer.epochs)")
    lr: Optional[Float] = Field(None, gt=0, le=10, description="default: transfer.lr")

    @field_validator("student")
    @classmethod
    def _student_source(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else known_source(v)


class QATConfig(_Strict):
    epochs: Int = Field(3, ge=0, le=10000)
    lr: Optional[Float] = Field(None, gt=0, le=10, description="default: transfer.lr / 10")
    enabled: bool = Field(True, description="false: the accuracy guard never tries QAT (method: qat still does)")


class QuantizeConfig(_Strict):
    calibration_samples: Int = Field(300, ge=1, le=100000)
    qat: QATConfig = Field(default_factory=QATConfig)


class SearchConfig(_Strict):
    """compress.search: the fastest candidate per target that meets every budget."""

    prune_ratios: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7])
    stage_ratios: list[dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]]] = Field(default_factory=list, description="more candidates: per-stage ratios")
    importance: list[Literal["l1", "l2", "taylor"]] = Field(default_factory=lambda: ["l2"])
    scope: list[Literal["global", "uniform"]] = Field(default_factory=lambda: ["uniform"])
    precisions: Optional[list[Literal["fp32", "fp16", "int8", "int8-float-ends"]]] = Field(None, description="default: every one the runtime has")
    max_candidates: Int = Field(48, ge=1, le=10000)
    minutes: Float = Field(30.0, gt=0, le=10000)
    finalists: Int = Field(3, ge=1, le=100, description="candidates per round of full recovery (successive halving)")
    recover_epochs: Optional[Int] = Field(None, ge=0, le=10000, description="default: compress.prune.recover_epochs, else 2")
    holdout: Float = Field(0.5, gt=0, le=1, description="part of val the proxy accuracy is scored on")
    recalibration_samples: Int = Field(256, ge=1, le=100000, description="train images for the BatchNorm recalibration")
    benchmark_seconds: Float = Field(1.5, gt=0, le=600)
    input_sizes: list[tuple[int, int]] = Field(default_factory=list, description="more input resolutions [height, width] to search "
                                                "(the build's preprocess.input_size always is one); default: only the build's")

    @field_validator("input_sizes", mode="before")
    @classmethod
    def _sizes(cls, v):
        if not isinstance(v, (list, tuple)):
            raise ValueError("expected a list of [height, width] pairs, e.g. [[224, 224], [160, 160]]")
        for s in v:
            if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)):
                raise ValueError(f"{s!r} is not a [height, width] pair of whole numbers, e.g. [160, 160]")
            if not all(1 <= x <= MAX_SIDE for x in s):
                raise ValueError(f"{list(s)}: height and width must be between 1 and {MAX_SIDE}")
        return [tuple(s) for s in v]


class CompressConfig(_Strict):
    prune: Optional[PruneConfig] = None
    distill: Optional[DistillConfig] = None
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    search: Optional[SearchConfig] = None
