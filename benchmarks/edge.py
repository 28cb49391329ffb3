"""Edge runtimes side by side: LiteRT and ExecuTorch (fp32 and int8) against ONNX Runtime and
OpenVINO, and against each runtime's plain hand-written recipe, for hf ResNet-18 and MobileNetV2
configs at 224x224, batch 1, 2 threads, in one process with one timing harness; then the
emulation costs (one-time arm64 root, per-image emulated validation).

    python -m benchmarks.edge [--emulated-dist DIST]   # writes benchmarks/edge.json, re-renders BENCHMARKS.md

The edgebuild rows go through the runtime adapters exactly as a build does (export, int8 with
the calibration set, runner with the profile's threads). The models are randomly initialised
from their configs: latency does not depend on the weights; accuracy is not measured here.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from .run import THREADS, hf_config, machine_info, recipes, timeit

ROOT = Path(__file__).resolve().parent.parent


def _profile(name: str):
    from edgebuild.profiles import ProfileRegistry

    return ProfileRegistry().get(name)


def edgebuild_rows(model, x: np.ndarray, calib: np.ndarray, work: Path, opts) -> dict:
    """fp32 and int8 artifacts of the new host runtimes, through edgebuild's adapters."""
    import torch

    from edgebuild.runtimes import adapter

    rows = {}
    for prof_name in ("x86-litert-int8", "x86-executorch-xnnpack-int8", "x86-onnxruntime-int8"):
        prof = _profile(prof_name)
        rt = adapter(prof.runtime)
        edir, qdir = work / f"{prof.runtime}-fp32", work / f"{prof.runtime}-int8"
        edir.mkdir()
        qdir.mkdir()
        t0 = time.perf_counter()
        rt.export(model, torch.from_numpy(x), prof, edir)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        qmeta = rt.quantize(prof, edir, qdir, calib, {}, None)
        quant_s = time.perf_counter() - t0
        for prec, d in (("fp32", edir), ("int8", qdir)):
            r = rt.runner(prof, d, prec)
            label = f"edgebuild {prof.runtime} {prec}"
            rows[label] = timeit(r._run, x, opts.warmup, opts.iters, opts.seconds)
            rows[label]["bytes"] = sum((d / f).stat().st_size for f in rt.model_files(prof) if (d / f).is_file())
            rows[label]["build_seconds"] = round(export_s + (quant_s if prec == "int8" else 0), 1)
            if prec == "int8":
                rows[label]["tool"] = qmeta.get("tool")
    return rows


def plain_rows(model, x: np.ndarray, calib: np.ndarray, work: Path, opts) -> dict:
    """What a user writes from each runtime's getting-started page, default settings."""
    import litert_torch
    import torch
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    rows = {}
    xt = torch.from_numpy(x)
    p = work / "plain.tflite"
    litert_torch.convert(model, (xt,)).export(str(p))
    it = Interpreter(model_path=str(p))  # default threads
    it.allocate_tensors()
    i0, o0 = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def lite(a, it=it):
        it.set_tensor(i0, a)
        it.invoke()
        return it.get_tensor(o0)

    rows["LiteRT fp32 (plain: convert + Interpreter defaults)"] = timeit(lite, x, opts.warmup, opts.iters, opts.seconds)
    q = quantizer.Quantizer(str(p))
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    pq = work / "plain-dyn.tflite"
    q.quantize().export_model(str(pq), overwrite=True)
    it2 = Interpreter(model_path=str(pq))
    it2.allocate_tensors()
    j0, k0 = it2.get_input_details()[0]["index"], it2.get_output_details()[0]["index"]

    def lite2(a):
        it2.set_tensor(j0, a)
        it2.invoke()
        return it2.get_tensor(k0)

    rows["LiteRT int8 weights (plain: quantizer dynamic_wi8_afp32)"] = timeit(lite2, x, opts.warmup, opts.iters, opts.seconds)
    pe = work / "plain.pte"
    pe.write_bytes(to_edge_transform_and_lower(torch.export.export(model, (xt,)), partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    meth = Runtime.get().load_program(str(pe)).load_method("forward")  # default threadpool
    rows["ExecuTorch fp32 (plain: XNNPACK tutorial, default threads)"] = timeit(lambda a: meth.execute([torch.from_numpy(a)]), x,
                                                                                 opts.warmup, opts.iters, opts.seconds)
    return rows


EMU_SCRIPT = """
import sys, time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2]); s.run(None, {"input": x})
t = []
for _ in range(3):
    t0 = time.perf_counter(); s.run(None, {"input": x}); t.append(time.perf_counter() - t0)
print(sorted(t)[1] * 1000)
"""


def emulation_costs(onnx_path: Path, x: np.ndarray, host_ms: float) -> dict:
    """The one-time root setup as recorded, and one 224 px inference under qemu-user now."""
    import shutil

    from edgebuild.cache import default_root
    from edgebuild.emulate import VENV, chroot, install_requirements, root_dir

    root = root_dir(default_root())
    ready = root / ".edgebuild-ready.json"
    if not ready.is_file():
        return {"status": "not measured: no emulation root on this host (run a build with --emulate first)"}
    out = {"root_setup": json.loads(ready.read_text())}
    work = root / "tmp" / "edgebuild-bench"
    work.mkdir(exist_ok=True)
    try:
        (work / "requirements.txt").write_text("onnxruntime\nnumpy\n")
        install_requirements(root, work / "requirements.txt")
        shutil.copyfile(onnx_path, work / "m.onnx")
        np.save(work / "x.npy", x)
        (work / "t.py").write_text(EMU_SCRIPT)
        r = chroot(root, [f"{VENV}/bin/python", "/tmp/edgebuild-bench/t.py", "/tmp/edgebuild-bench/m.onnx", "/tmp/edgebuild-bench/x.npy"], timeout=1800)
        if r.returncode == 0:
            ms = float(r.stdout.decode().strip().splitlines()[-1])
            out["resnet18_onnxruntime_fp32_224"] = {"emulated_ms": ms, "host_ms": host_ms, "slowdown": ms / host_ms}
        else:
            out["resnet18_onnxruntime_fp32_224"] = {"error": r.stderr.decode(errors="replace")[-300:]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def emulated_figures(dist: Path) -> dict:
    out = {}
    for mf in sorted(dist.glob("*/manifest.json")):
        m = json.loads(mf.read_text())["metrics"]
        if m.get("status") == "emulated":
            e = m["emulation"]
            out[json.loads(mf.read_text())["target"]["name"]] = {
                "accuracy": m["accuracy"], "agreement": m["agreement"], "images": e["images"], "seconds_per_image": e["seconds_per_image"],
                "selftest_seconds": e["selftest_seconds"], "requirements_install_seconds": e["requirements_install_seconds"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--models", default="resnet18,mobilenetv2")
    ap.add_argument("--emulated-dist", help="dist/ of an 'edgebuild build --emulate' of the digits example: its per-image emulated validation times")
    opts = ap.parse_args(argv)
    import torch
    import transformers

    from edgebuild.backbones import LogitsOnly

    torch.set_num_threads(THREADS)
    res = {"machine": machine_info(), "threads": THREADS, "batch": 1, "command": "python -m benchmarks.edge",
           "python": platform.python_version(), "models": {}}
    rng = np.random.default_rng(0)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None], np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    calib = ((rng.random((32, 3, 224, 224), dtype=np.float32) - mean) / std).astype(np.float32)
    for kind in opts.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            torch.manual_seed(0)
            model = LogitsOnly(transformers.AutoModelForImageClassification.from_config(hf_config(kind))).eval()
            x = calib[:1]
            rows, macs = recipes(kind, work, calib, opts)
            rows.update(plain_rows(model, x, calib, work, opts))
            rows.update(edgebuild_rows(model, x, calib, work, opts))
            res["models"][kind] = {"macs": macs, "rows": rows}
            print(json.dumps({kind: {k: round(v["p50_ms"], 3) for k, v in rows.items()}}, indent=1), flush=True)
            if kind == "resnet18":
                res["emulation"] = emulation_costs(work / f"{kind}.onnx", x, rows["ONNX Runtime fp32"]["p50_ms"])
    if opts.emulated_dist:
        res.setdefault("emulation", {})["digits"] = emulated_figures(Path(opts.emulated_dist))
    (ROOT / "benchmarks" / "edge.json").write_text(json.dumps(res, indent=2) + "\n")
    from .run import main as run_main

    return run_main(["--render"])  # BENCHMARKS.md gets the section below


def render_section(res: dict) -> list[str]:
    """The edge-runtime section of BENCHMARKS.md."""
    parts = ["## Edge runtimes: LiteRT and ExecuTorch beside ONNX Runtime and OpenVINO", "",
             f"Generated by `{res['command']}` (benchmarks/edge.json); batch {res['batch']}, {res['threads']} threads, "
             "224x224, one process, one timing harness (p50 after warm-up). 'edgebuild' rows are the runtime adapters as a build "
             "uses them (int8 calibrated on 32 images); 'plain' rows are each runtime's getting-started recipe with default "
             "settings; the ONNX Runtime/OpenVINO rows are the hand-written recipes of the main benchmark.", ""]
    for kind, m in res["models"].items():
        rows = m["rows"]
        base = rows.get("ONNX Runtime fp32", {}).get("p50_ms")
        parts += [f"### {kind} ({m['macs'] / 1e9:.2f} GMACs)", "", "| artifact | p50 ms | p90 ms | vs ONNX Runtime fp32 | size MB |", "|---|---|---|---|---|"]
        for label, r in rows.items():
            rel = f"{base / r['p50_ms']:.2f}x" if base else "-"
            size = f"{r['bytes'] / 1e6:.1f}" if r.get("bytes") else "-"
            parts.append(f"| {label} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {rel} | {size} |")
        parts.append("")
        for rt in ("litert", "executorch", "onnxruntime"):
            f, q = rows.get(f"edgebuild {rt} fp32"), rows.get(f"edgebuild {rt} int8")
            if f and q:
                verdict = "pays off" if q["p50_ms"] < 0.9 * f["p50_ms"] else "does NOT pay off"
                parts.append(f"- {rt}: int8 {q['p50_ms']:.2f} ms vs fp32 {f['p50_ms']:.2f} ms ({f['p50_ms'] / q['p50_ms']:.2f}x): int8 {verdict} here.")
        parts.append("")
    emu = res.get("emulation") or {}
    setup = emu.get("root_setup")
    if setup:
        st = setup["steps"]
        parts += ["### Emulation (qemu-user, aarch64)", "",
                  f"- one-time arm64 root: {setup['setup_seconds'] / 60:.1f} min (debootstrap {st['debootstrap']:.0f} s, python3 and pip "
                  f"{st['python3']:.0f} s, venv {st['venv']:.0f} s; {setup.get('qemu')}); each bundle's requirements are then pip-installed "
                  "there once (3-30 s on the digits example)."]
        r18 = emu.get("resnet18_onnxruntime_fp32_224") or {}
        if "emulated_ms" in r18:
            parts.append(f"- ResNet-18 fp32 in ONNX Runtime, one 224x224 image: {r18['emulated_ms']:.0f} ms emulated vs {r18['host_ms']:.1f} ms "
                         f"natively on this host ({r18['slowdown']:.0f}x slower): emulation checks results, never speed.")
        digits = emu.get("digits") or {}
        if digits:
            parts += ["", "Emulated validation of the digits example (`edgebuild build --emulate`, 32x32 CNN, the bundle's own infer.py "
                      "in the arm64 root; time includes the runtime's start-up):", "",
                      "| target | val images | s per image | self-test s | accuracy | agreement |", "|---|---|---|---|---|---|"]
            for t, d in digits.items():
                parts.append(f"| {t} | {d['images']} | {d['seconds_per_image']:.3f} | {d['selftest_seconds']:.1f} | {d['accuracy']:.4f} | {d['agreement']:.4f} |")
        parts.append("")
    else:
        parts += [f"Emulation: {emu.get('status', 'not measured')}", ""]
    return parts


if __name__ == "__main__":
    raise SystemExit(main())
