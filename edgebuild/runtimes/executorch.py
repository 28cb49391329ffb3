"""ExecuTorch adapter: ``torch.export`` then ``to_edge_transform_and_lower`` with the XNNPACK
partitioner to a .pte program; int8 by PT2E with the XNNPACK quantizer (static, symmetric,
per-channel weights); run by ``executorch.runtime.Runtime``. Needs the ``executorch`` extra.

The export entry also keeps the exported fp32 program (``program.pt2``): PT2E quantization
starts from it, not from the lowered .pte."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import TargetProfile
from ..errors import ModelError
from . import Adapter, Runner, native_logs_dropped

PROGRAM = "program.pt2"


class EtRunner(Runner):
    def __init__(self, path: Path, profile: TargetProfile):
        import torch
        from executorch.runtime import Runtime

        with native_logs_dropped():
            if profile.threads:
                from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

                _unsafe_reset_threadpool(profile.threads)
            self.method = Runtime.get().load_program(str(path)).load_method("forward")
        self._torch = torch
        self.static_batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        from ..stages.bundle import pkg_version

        self.settings = {"runtime": "executorch", "runtime_version": pkg_version("executorch"), "backend": "XnnpackBackend",
                         "threads": profile.threads or "default"}

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.method.execute([self._torch.from_numpy(x)])[0].numpy()


def lower(ep, path: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with native_logs_dropped():
        path.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def float_layer_names(gm) -> list[str]:
    """Module paths of the first convolution and the last linear layer of an exported graph."""
    convs, linears = [], []
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if n.op != "call_function" or not stack:
            continue
        name = str(n.target)
        path = list(stack.values())[-1][0]
        if "conv" in name and path not in convs:
            convs.append(path)
        elif "linear" in name and path not in linears:
            linears.append(path)
    return [p for p in (convs[:1] + linears[-1:]) if p]


def quantize_pt2e(src: Path, dst: Path, calib: np.ndarray, profile: TargetProfile, float_layers: bool) -> dict:
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from ..stages.quantize import quiet

    static = profile.batch if isinstance(profile.batch, int) else 1
    t0 = time.perf_counter()
    kept: list[str] = []
    try:
        with quiet(), native_logs_dropped():
            ep = torch.export.load(str(src / PROGRAM))
            gm = ep.module()
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=profile.quantization.per_channel))
            if float_layers:
                kept = float_layer_names(gm)
                for name in kept:
                    quantizer.set_module_name(name, None)
            prepared = prepare_pt2e(gm, quantizer)
            with torch.no_grad():
                for b in range(0, len(calib) - static + 1, static):
                    prepared(torch.from_numpy(np.ascontiguousarray(calib[b : b + static], dtype=np.float32)))
            converted = convert_pt2e(prepared)
            x = torch.zeros((static,) + tuple(calib.shape[1:]))
            lower(torch.export.export(converted, (x,)), dst / "model.pte")
    except Exception as e:
        raise ModelError(f"ExecuTorch PT2E quantization failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                         hint="use an fp32 ExecuTorch target, or fallback: fp32 in the profile") from e
    return {"tool": "torchao PT2E prepare_pt2e/convert_pt2e + XNNPACKQuantizer", "scheme": "static symmetric int8",
            "per_channel": profile.quantization.per_channel, "float_layers": kept, "seconds": time.perf_counter() - t0}


class EtAdapter(Adapter):
    name = "executorch"
    extra = "executorch"
    modules = ("executorch.exir", "executorch.runtime", "executorch.backends.xnnpack.partition.xnnpack_partitioner")
    packages = ("executorch", "torchao")
    package = "executorch"

    def model_files(self, profile: TargetProfile) -> list[str]:
        return ["model.pte"]

    def export(self, model, example, profile: TargetProfile, out: Path) -> dict:
        import torch

        from ..stages.export import convert

        def run(m, x):
            ep = torch.export.export(m, (x,))
            torch.export.save(ep, str(out / PROGRAM))
            lower(ep, out / "model.pte")

        _, seconds = convert(model, example, profile.batch, "ExecuTorch export", run)
        return {"format": "pte", "tool": "to_edge_transform_and_lower + XnnpackPartitioner", "seconds": seconds,
                "bytes": (out / "model.pte").stat().st_size}

    def quantize_plan(self, profile: TargetProfile) -> list[tuple[str, dict]]:
        return [("plain", {}), ("first conv and head in float", {"float_layers": True})]

    def quantize(self, profile: TargetProfile, src: Path, dst: Path, calib: np.ndarray, opts: dict, ac: dict | None) -> dict:
        return quantize_pt2e(src, dst, calib, profile, bool(opts.get("float_layers")))

    def runner(self, profile: TargetProfile, artifact_dir: Path, precision: str) -> Runner:
        return EtRunner(artifact_dir / "model.pte", profile)

    def template_context(self, profile: TargetProfile, precision: str) -> dict:
        from ..stages.bundle import pkg_version

        # executorch's Python runtime passes torch tensors: the bundle needs the CPU torch wheel
        return {"extra_requirements": [f"torch=={pkg_version('torch')}"],
                "index_urls": ["https://download.pytorch.org/whl/cpu"]}


ADAPTER = EtAdapter()
