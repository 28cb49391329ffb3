"""Quantization-aware training with NNCF for PyTorch, then export to each runtime.

``nncf.quantize`` on the torch model inserts NNCF's fake quantizers (ranges initialised from
the calibration set); the model is then fine-tuned with them in place (BatchNorm statistics
frozen, distilling from the fp32 model), so the weights learn to live with int8 rounding.

Export per runtime:
- ONNX Runtime: ``nncf.strip(..., example_input=...)`` turns NNCF's quantizers into PyTorch's
  FakeQuantize (it needs ``torchao``), and the TorchScript ONNX exporter writes them as standard
  QuantizeLinear/DequantizeLinear pairs. (A plain export of the NNCF model writes OpenVINO's
  FakeQuantize custom op, which ONNX Runtime cannot load; the torch.export-based exporter
  cannot trace FakeQuantize's observer branch.)
- OpenVINO: ``ov.convert_model`` of the NNCF model gives OpenVINO FakeQuantize ops, which the
  CPU plugin runs in int8.

NNCF JIT-compiles a C++ extension on first use; its default 60 s load timeout is too short on
a small machine, so ``NNCF_EXTENSION_LOAD_TIMEOUT`` defaults to 0 (no timeout), and the build
goes to ``TORCH_EXTENSIONS_DIR`` (by default under edgebuild's cache, never under HOME).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from .lazy import torch, nn

from .errors import ModelError


@functools.lru_cache(maxsize=None)
def _wrapper_class():
    class _Wrapped(nn.Module):
        """NNCF adds a hook-storage submodule to the model it quantizes; a top-level nn.Sequential
        would then call it as a layer. One plain wrapper avoids that for every model."""

        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    return _Wrapped  # defined on first use: importing this module does not import torch


def _environment(ext_dir: Optional[Path]) -> None:
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    if ext_dir is not None:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ext_dir))


@contextlib.contextmanager
def _quiet():
    """torchao prints CUDA-kernel load failures and NNCF logs progress bars; neither matters here."""
    loggers = [logging.getLogger(n) for n in ("nncf", "torchao", "torch")]
    old = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


@dataclass
class QATJob:
    """Everything a QAT attempt needs; ``model`` is called only if the attempt runs."""

    model: Callable[[], nn.Module]  # the fp32 model the artifact was exported from
    example: torch.Tensor
    Xtrain: np.ndarray
    ytrain: np.ndarray
    Xval: np.ndarray
    yval: np.ndarray
    epochs: int = 3
    lr: float = 0.001
    batch_size: int = 64
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 0.5
    ext_dir: Optional[Path] = None
    progress: Any = None
    fit_kwargs: dict = field(default_factory=dict)  # e.g. the transfer stage's augmentation

    def label(self) -> str:
        return f"quantization-aware training (NNCF, {self.epochs} epoch{'s' if self.epochs != 1 else ''})"

    def run(self, profile, dst: Path, calib: np.ndarray) -> dict:
        t0 = time.perf_counter()
        qmodel = train(self, calib, preset=profile.quantization.preset)
        info = export(qmodel, self.example, profile, dst)
        return {"tool": "nncf.quantize (torch) + fine-tuning", "epochs": self.epochs, "lr": self.lr, **info,
                "seconds": time.perf_counter() - t0}


def train(job: QATJob, calib: np.ndarray, preset: str = "performance") -> nn.Module:
    """The fp32 model with NNCF fake quantizers, fine-tuned; returns it in eval mode."""
    _environment(job.ext_dir)
    from .training import fit, seed_everything

    try:
        with _quiet():
            import nncf

            teacher = job.model().cpu().eval()
            seed_everything(job.seed)
            model = _wrapper_class()(copy.deepcopy(teacher)).eval()
            items = [torch.as_tensor(np.ascontiguousarray(calib[b : b + 16], dtype=np.float32)) for b in range(0, len(calib), 16)]
            qpreset = nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
            qmodel = nncf.quantize(model, nncf.Dataset(items), preset=qpreset, subset_size=len(calib))
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"NNCF could not prepare the model for quantization-aware training: {type(e).__name__}: {_first_line(e)}",
                         hint="use method: static in the target profile's quantization") from e
    seed_everything(job.seed)
    # BatchNorm statistics stay frozen (train_mode False): the quantizer ranges were set for them
    fit(qmodel, qmodel.parameters(), job.Xtrain, job.ytrain, job.Xval, job.yval, epochs=job.epochs, lr=job.lr,
        batch_size=job.batch_size, seed=job.seed, progress=job.progress, label="quantization-aware training",
        teacher=teacher if job.alpha > 0 else None, temperature=job.temperature, alpha=job.alpha, train_mode=False, **job.fit_kwargs)
    return qmodel.cpu().eval()


def export(qmodel: nn.Module, example: torch.Tensor, profile, dst: Path) -> dict:
    from .stages.export import INPUT_NAME, OUTPUT_NAME

    batch = profile.batch
    x = torch.zeros(((batch if isinstance(batch, int) else 1),) + tuple(example.shape[1:]))
    try:
        with _quiet(), torch.no_grad():
            if profile.runtime == "onnxruntime":
                import nncf

                stripped = nncf.strip(qmodel, example_input=x)
                kwargs = {"dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}} if batch == "dynamic" else {}
                torch.onnx.export(stripped, (x,), str(dst / "model.onnx"), dynamo=False, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], opset_version=profile.opset, **kwargs)
                return {"format": "QDQ (nncf.strip -> torch FakeQuantize -> ONNX QuantizeLinear/DequantizeLinear)"}
            import openvino as ov

            from .runtimes.openvino import save_model

            shape = [-1 if batch == "dynamic" else int(batch)] + list(example.shape[1:])
            ovm = ov.convert_model(qmodel, example_input=x, input=[ov.PartialShape(shape)])
            save_model(ovm, dst / "model.xml", compress_to_fp16=False)
            return {"format": "OpenVINO IR with FakeQuantize"}
    except Exception as e:
        raise ModelError(f"exporting the quantization-aware trained model failed: {type(e).__name__}: {_first_line(e)}",
                         hint="use method: static in the target profile's quantization") from e


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


# ----------------------------------------------------------------------------------------------
# How a build uses it
# ----------------------------------------------------------------------------------------------


def planned(cfg, prof, max_accuracy_drop) -> Optional[dict]:
    """The QAT settings that key a target's quantize step, or None where QAT cannot run: it runs
    for ``method: qat`` and, as the accuracy guard's last remedy, where an accuracy budget is set."""
    from .runtimes import adapter

    q = cfg.compress.quantize.qat
    if not adapter(prof.runtime).qat or prof.format not in ("onnx", "openvino"):  # export() below writes ONNX QDQ or OpenVINO IR only
        return None
    if prof.precision != "int8" or not (prof.quantization.method == "qat" or (q.enabled and max_accuracy_drop is not None)):
        return None
    dc = cfg.compress.distill
    return {"epochs": q.epochs, "lr": q.lr if q.lr is not None else cfg.transfer.effective_lr / 10, "batch_size": cfg.transfer.batch_size,
            "temperature": dc.temperature if dc else 4.0, "alpha": dc.alpha if dc else 0.5, "seed": cfg.seed}


def key_step(qparams: dict, qinputs: dict, cfg, prof, model_key: str) -> None:
    """Where QAT may run, its settings and the PyTorch model it fine-tunes key the quantize step."""
    params = planned(cfg, prof, qparams.get("max_accuracy_drop"))
    if params is not None:
        from importlib import metadata

        qparams["qat"] = params
        qinputs.update({"torch_model": model_key, "qat_tools": [_version(metadata, "nncf"), _version(metadata, "torchao")]})


def _version(metadata, name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def job(params: Optional[dict], model: Callable[[], nn.Module], example: torch.Tensor, data, cache_root: Optional[Path], progress,
        fit_kwargs: Optional[dict] = None) -> Optional[QATJob]:
    if params is None:
        return None
    return QATJob(model=model, example=example, Xtrain=data.Xtrain, ytrain=data.ytrain, Xval=data.Xval, yval=data.yval,
                  ext_dir=(Path(cache_root) / "torch_extensions") if cache_root else None, progress=progress,
                  fit_kwargs=fit_kwargs or {}, **params)
