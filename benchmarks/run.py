"""Side-by-side benchmarks: edgebuild's artifacts against the usual hand-written recipes.

    python -m benchmarks.run            # full run, rewrites BENCHMARKS.md and benchmarks/results.json
    python -m benchmarks.run --quick    # few iterations, for checking the harness

Everything runs in one process on this machine: batch 1, 2 threads, warm-up then timed runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from benchmarks.sections import keep_sections

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
HOST_PROFILES = ["x86-onnxruntime-fp32", "x86-onnxruntime-int8", "x86-openvino-fp32", "x86-openvino-fp16", "x86-openvino-int8"]


# ----------------------------------------------------------------------------------------------
# timing harness (the same for every row)
# ----------------------------------------------------------------------------------------------


def timeit(fn, x, warmup: int, iters: int, max_seconds: float) -> dict:
    for _ in range(warmup):
        fn(x)
    times = []
    t_end = time.perf_counter() + max_seconds
    while len(times) < iters and (len(times) < 10 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(times)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)), "iterations": len(a)}


# ----------------------------------------------------------------------------------------------
# hardware limit
# ----------------------------------------------------------------------------------------------


def machine_limit(opts) -> dict:
    """Attainable fp32 and int8 multiply-accumulate rates on this CPU: large matmuls in ONNX
    Runtime (MatMul, MatMulInteger u8 x s8) and OpenVINO (f32 MatMul; FakeQuantize'd MatMul,
    which its CPU plugin runs as a u8 x i8 FullyConnected), 2 threads; the best of each."""
    import onnxruntime as ort
    import openvino as ov
    import openvino.opset13 as ops
    from onnx import TensorProto, helper, numpy_helper

    n = 1024
    rng = np.random.default_rng(0)
    rates = {}

    def best_rate(fn, x):
        for _ in range(3):
            fn(x)
        best = min(_once(fn, x) for _ in range(opts.mm_iters))
        return n**3 / best / 1e9

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "mm",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])], [w])
    s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((n, n)).astype(np.float32)
    rates["onnxruntime fp32 MatMul"] = best_rate(lambda x: s.run(None, {"A": x}), a)
    w8 = numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "W")
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "W"], ["Y"])], "mmi",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [w8])
    s8 = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), so, providers=["CPUExecutionProvider"])
    rates["onnxruntime int8 MatMulInteger"] = best_rate(lambda x: s8.run(None, {"A": x}), rng.integers(0, 255, (n, n), dtype=np.uint8))

    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(THREADS)}

    def fq(node, lo, hi, levels):
        c = [ops.constant(np.float32(v)) for v in (lo, hi, lo, hi)]
        return ops.fake_quantize(node, *c, levels)

    p = ops.parameter([n, n], np.float32, name="A")
    wf = ops.constant(rng.standard_normal((n, n)).astype(np.float32))
    req = core.compile_model(ov.Model([ops.matmul(p, wf, False, False)], [p]), "CPU", cfg).create_infer_request()
    rates["openvino fp32 MatMul"] = best_rate(lambda x: req.infer({0: x}), a)
    p = ops.parameter([n, n], np.float32, name="A")
    req8 = core.compile_model(ov.Model([ops.matmul(fq(p, 0, 4, 256), fq(wf, -4, 4, 255), False, False)], [p]), "CPU", cfg).create_infer_request()
    rates["openvino int8 FakeQuantize MatMul"] = best_rate(lambda x: req8.infer({0: x}), np.abs(a))
    fp32 = max(v for k, v in rates.items() if "fp32" in k)
    int8 = max(v for k, v in rates.items() if "int8" in k)
    return {"fp32_gmacs": fp32, "int8_gmacs": int8, "all": rates, "isa_peak": isa_peak(),
            "method": f"best of ONNX Runtime and OpenVINO {n}x{n}x{n} matmuls, {THREADS} threads, fastest of {opts.mm_iters} runs"}


def isa_peak() -> dict:
    """Theoretical multiply-accumulate peak from /proc/cpuinfo: cores x clock x MACs per cycle
    (two FMA ports: AVX-512 32 fp32 MAC/cycle, VNNI 4x that in int8; AVX2 half of each)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    mhz = max((float(line.split(":", 1)[1]) for line in info.splitlines() if line.startswith("cpu MHz")), default=0.0)
    fp32 = 32 if "avx512f" in flags else 16 if "avx2" in flags else 8
    int8 = fp32 * (4 if ("avx512_vnni" in flags or "avx_vnni" in flags) else 2)
    cores = os.cpu_count() or 1
    return {"mhz": mhz, "cores": cores, "fp32_gmacs": cores * mhz * fp32 / 1e3, "int8_gmacs": cores * mhz * int8 / 1e3,
            "assumes": f"{fp32} fp32 / {int8} int8 MACs per cycle per core at {mhz:.0f} MHz (no turbo)"}


def _once(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# models and projects
# ----------------------------------------------------------------------------------------------


def hf_config(kind: str):
    import transformers

    if kind == "resnet18":
        return transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                         layer_type="basic", num_labels=1000)
    if kind == "mobilenetv2":
        return transformers.MobileNetV2Config(num_labels=1000, image_size=224)
    raise ValueError(kind)


def make_project(root: Path, kind: str, prune_ratio: float, n_train: int, n_val: int) -> Path:
    from PIL import Image

    hf_config(kind).save_pretrained(root / "hf")
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(4):
            d = root / "data" / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
                arr[..., c % 3] //= 2
                Image.fromarray(arr, "RGB").save(d / f"{i}.png")
    prune = ""
    if prune_ratio:
        prune = f"  prune: {{ratio: {prune_ratio}, importance: l2, recover_epochs: 1}}\n  distill: {{temperature: 4.0, alpha: 0.5}}\n"
    (root / "edgebuild.yaml").write_text(textwrap.dedent(f"""\
        name: {kind}
        seed: 0
        backbone: {{source: "hf:hf"}}
        data: {{train: data/train, val: data/val}}
        preprocess: {{input_size: [224, 224], color: rgb, resize: stretch, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
        transfer: {{mode: features, epochs: 1, batch_size: 16, lr: 0.01}}
        compress:
        """) + prune + "  quantize: {calibration_samples: 64}\n" + f"targets: {HOST_PROFILES}\n")
    return root / "edgebuild.yaml"


def build(config: Path, out: Path, cache: Path) -> dict:
    from edgebuild.cache import Cache
    from edgebuild.config import load_build_config
    from edgebuild.pipeline import Build
    from edgebuild.progress import Progress

    cfg = load_build_config(config)
    t0 = time.perf_counter()
    res = Build(cfg, None, out, Cache(cache), Progress("plain")).run()
    res.report["wall_seconds"] = time.perf_counter() - t0
    return res.report


# ----------------------------------------------------------------------------------------------
# hand-written recipes
# ----------------------------------------------------------------------------------------------


def recipes(kind: str, work: Path, calib: np.ndarray, opts) -> tuple[dict, int]:
    """The usual scripts a user would write, each timed with the same harness."""
    import onnxruntime as ort
    import openvino as ov
    import torch

    from edgebuild.backbones import LogitsOnly
    from edgebuild.metrics import count_macs

    import transformers

    torch.manual_seed(0)
    model = LogitsOnly(transformers.AutoModelForImageClassification.from_config(hf_config(kind))).eval()
    x = calib[:1]
    macs = count_macs(model, torch.from_numpy(x))
    rows = {}
    torch.set_num_threads(THREADS)
    with torch.inference_mode():
        rows["PyTorch eager fp32"] = timeit(lambda a: model(torch.from_numpy(a)), x, opts.warmup, opts.iters, opts.seconds)
    onnx_path = work / f"{kind}.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(onnx_path), dynamo=True, external_data=False, opset_version=18,
                      input_names=["input"], output_names=["logits"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    rows["ONNX Runtime fp32"] = timeit(lambda a: s.run(None, {"input": a}), x, opts.warmup, opts.iters, opts.seconds)
    rows["ONNX Runtime fp32"]["bytes"] = onnx_path.stat().st_size
    # plain quantize_static defaults
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class R(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    q_path = work / f"{kind}-ort-int8.onnx"
    quantize_static(str(onnx_path), str(q_path), R())
    s8 = ort.InferenceSession(str(q_path), so, providers=["CPUExecutionProvider"])
    rows["ONNX Runtime int8 (quantize_static defaults)"] = timeit(lambda a: s8.run(None, {"input": a}), x, opts.warmup, opts.iters, opts.seconds)
    rows["ONNX Runtime int8 (quantize_static defaults)"]["bytes"] = q_path.stat().st_size
    core = ov.Core()
    ovm = ov.convert_model(str(onnx_path))
    for label, cfg in (("OpenVINO f32 forced", {"INFERENCE_PRECISION_HINT": "f32"}), ("OpenVINO default precision", {})):
        c = core.compile_model(ovm, "CPU", {"INFERENCE_NUM_THREADS": str(THREADS), "PERFORMANCE_HINT": "LATENCY", **cfg})
        req = c.create_infer_request()
        rows[label] = timeit(lambda a: req.infer({0: a}), x, opts.warmup, opts.iters, opts.seconds)
        rows[label]["inference_precision"] = c.get_property("INFERENCE_PRECISION_HINT").to_string()
    import nncf

    q = nncf.quantize(ovm, nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]))
    c = core.compile_model(q, "CPU", {"INFERENCE_NUM_THREADS": str(THREADS), "PERFORMANCE_HINT": "LATENCY"})
    req = c.create_infer_request()
    rows["OpenVINO int8 (nncf.quantize defaults)"] = timeit(lambda a: req.infer({0: a}), x, opts.warmup, opts.iters, opts.seconds)
    for r in rows.values():
        r["macs"] = macs
    return rows, macs


def edgebuild_rows(dist: Path, label: str, opts, x: np.ndarray) -> dict:
    from edgebuild.config import TargetProfile
    from edgebuild.runtimes import open_runner

    rows = {}
    for b in sorted(p for p in dist.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = json.loads((b / "manifest.json").read_text())
        prof = TargetProfile.model_validate(m["target"])
        r = open_runner(prof, b)
        row = timeit(r._run, np.repeat(x[:1], r.static_batch or 1, axis=0), opts.warmup, opts.iters, opts.seconds)
        row.update({"bytes": m["metrics"]["size_bytes"], "macs": m["metrics"]["macs"], "accuracy": m["metrics"].get("accuracy"),
                    "precision": m["model"]["precision"], "settings": r.settings})
        rows[f"edgebuild {prof.name}{label}"] = row
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _limit(limit: dict, kind: str) -> float:
    """The machine's rate for ``kind``: the larger of the measured matmul rate and the ISA peak."""
    return max(limit[f"{kind}_gmacs"], (limit.get("isa_peak") or {}).get(f"{kind}_gmacs", 0.0))


def fmt_table(rows: dict, eager: float, best_hand: float, limit: dict) -> str:
    lines = ["| artifact | p50 ms | p90 ms | vs eager | vs best hand-written | size MB | MMACs | GMAC/s | % of machine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        gmacs = r["macs"] / (r["p50_ms"] / 1e3) / 1e9
        peak = _limit(limit, "int8" if "int8" in name else "fp32")
        size = f"{r['bytes'] / 1e6:.2f}" if r.get("bytes") else "-"
        lines.append(f"| {name} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {eager / r['p50_ms']:.2f}x | {best_hand / r['p50_ms']:.2f}x | {size} | "
                     f"{r['macs'] / 1e6:.0f} | {gmacs:.1f} | {100 * gmacs / peak:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="resnet18,mobilenetv2")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--render", action="store_true", help="only re-render BENCHMARKS.md from benchmarks/results.json")
    opts = ap.parse_args(argv)
    if opts.render:
        res = json.loads((ROOT / "benchmarks" / "results.json").read_text())
        if "isa_peak" not in res["limit"]:
            res["limit"]["isa_peak"] = isa_peak()
        Path(opts.out).write_text(keep_sections(Path(opts.out), render_md(res)))
        return 0
    opts.warmup, opts.iters, opts.seconds, opts.mm_iters = (3, 10, 2, 3) if opts.quick else (20, 150, 5, 10)
    import warnings

    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="edgebuild-bench-"))
    results = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "command": "python -m benchmarks.run" + (" --quick" if opts.quick else "")}
    print("measuring the machine limit", file=sys.stderr)
    limit = machine_limit(opts)
    results["limit"] = limit
    results["models"] = {}
    for kind in opts.models.split(","):
        print(f"== {kind}", file=sys.stderr)
        per = {}
        builds = {}
        for ratio in (0.0, 0.3, 0.5):
            proj = work / f"{kind}-{ratio}"
            cfg = make_project(proj, kind, ratio, n_train=4 if opts.quick else 16, n_val=2 if opts.quick else 8)
            builds[ratio] = build(cfg, proj / "dist", work / "cache")
        from edgebuild.data import load_image
        from edgebuild.config import load_build_config

        c = load_build_config(work / f"{kind}-0.0" / "edgebuild.yaml")
        files = sorted((work / f"{kind}-0.0" / "data" / "train").rglob("*.png"))
        calib = np.stack([load_image(f, c.preprocess) for f in files[:64]]).astype(np.float32)
        hand, macs = recipes(kind, work, calib, opts)
        per.update(hand)
        for ratio in (0.0, 0.3, 0.5):
            per.update(edgebuild_rows(work / f"{kind}-{ratio}" / "dist", "" if not ratio else f" pruned {int(ratio * 100)}%", opts, calib))
        results["models"][kind] = {"rows": per, "build_stage_seconds": {str(k): v.get("stage_seconds") for k, v in builds.items()},
                                   "transfer": {str(k): {kk: v["transfer"].get(kk) for kk in ("mean_epoch_seconds", "feature_seconds", "seconds")} for k, v in builds.items()}}
    results["digits"] = digits_side_by_side(work, opts)
    print("== rebuild costs", file=sys.stderr)
    results["rebuild"] = rebuild_costs(work)
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2, default=str))
    Path(opts.out).write_text(keep_sections(Path(opts.out), render_md(results)))
    print(f"wrote {opts.out}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime, openvino, torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


def digits_side_by_side(work: Path, opts) -> dict:
    """Accuracy of every artifact on the digits example: unpruned and pruned, per runtime, and
    features vs finetune epoch time."""
    out = {}
    ex = ROOT / "examples" / "digits"
    for label, cfgname in (("unpruned", "edgebuild.yaml"), ("pruned", "edgebuild-compressed.yaml")):
        if not (ex / cfgname).is_file():
            continue
        proj = work / f"digits-{label}"
        shutil.copytree(ex, proj, ignore=shutil.ignore_patterns("dist"))
        text = (proj / cfgname).read_text()
        import yaml

        d = yaml.safe_load(text)
        d["targets"] = HOST_PROFILES
        (proj / cfgname).write_text(yaml.safe_dump(d))
        rep = build(proj / cfgname, proj / "dist", work / "cache")
        out[label] = {"wall_seconds": rep["wall_seconds"], "stage_seconds": rep.get("stage_seconds"),
                      "fp32_reference_accuracy": rep["transfer"]["val_accuracy"],
                      "compression": rep.get("compression") or rep.get("prune"),
                      "targets": {t: {k: v["metrics"].get(k) for k in ("accuracy", "agreement", "latency_p50_ms", "size_bytes")} for t, v in rep["targets"].items()}}
    # features vs finetune epoch time on digits
    for mode in ("finetune", "features"):
        proj = work / f"digits-{mode}"
        shutil.copytree(ex, proj, ignore=shutil.ignore_patterns("dist"))
        import yaml

        d = yaml.safe_load((proj / "edgebuild.yaml").read_text())
        d["transfer"]["mode"] = mode
        d["targets"] = ["x86-onnxruntime-fp32"]
        (proj / "edgebuild.yaml").write_text(yaml.safe_dump(d))
        rep = build(proj / "edgebuild.yaml", proj / "dist", work / "cache")
        out[f"transfer_{mode}"] = {k: rep["transfer"].get(k) for k in ("mean_epoch_seconds", "feature_seconds", "seconds", "val_accuracy")}
    return out


def rebuild_costs(work: Path) -> dict:
    """Cold build, no-op rebuild and a one-target threads change of the digits example, each as
    the user runs it: a fresh `edgebuild build` process, wall time including start-up."""
    ex = ROOT / "examples" / "digits"
    proj = work / "digits-rebuild"
    shutil.copytree(ex, proj, ignore=shutil.ignore_patterns("dist"))
    cache = work / "rebuild-cache"
    env = dict(os.environ, EDGEBUILD_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "edgebuild", "build", str(proj / "edgebuild.yaml"), "--json"]

    def timed() -> float:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        return time.perf_counter() - t0

    out = {"cold_seconds": timed()}
    out["noop_seconds"] = min(timed() for _ in range(3))
    (proj / "targets").mkdir()
    (proj / "targets" / "x86-onnxruntime-int8.yaml").write_text("extends: x86-onnxruntime-fp32\nprecision: int8\nbatch: 1\nfallback: fp32\nthreads: 1\n"
                                                               "budgets: {min_agreement: 0.95}\n")
    out["threads_change_seconds"] = timed()
    out["targets"] = "the example's build file (4 targets)"
    return out


def targets_summary(res: dict) -> list[str]:
    """The project's performance targets, each with the measured figure and a verdict."""
    out = ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    hand = ["ONNX Runtime fp32", "ONNX Runtime int8 (quantize_static defaults)", "OpenVINO f32 forced", "OpenVINO default precision",
            "OpenVINO int8 (nncf.quantize defaults)"]

    def row(what, value, ok):
        out.append(f"| {what} | {value} | {'met' if ok else 'NOT met'} |")

    for kind, data in res["models"].items():
        r = data["rows"]
        p50 = {n: v["p50_ms"] for n, v in r.items()}
        eager, best_hand = p50["PyTorch eager fp32"], min(p50[n] for n in hand if n in p50)
        best = min(v for n, v in p50.items() if n.startswith("edgebuild"))
        row(f"{kind}: best edgebuild artifact >= 10x PyTorch eager", f"{eager / best:.1f}x", eager / best >= 10)
        for rt in ("openvino", "onnxruntime"):
            pr = p50.get(f"edgebuild x86-{rt}-int8 pruned 50%")
            if pr:
                row(f"{kind}: {rt} pruned-50% int8 >= 2x the best hand-written recipe", f"{best_hand / pr:.2f}x", best_hand / pr >= 2)
            u8, pf = p50.get(f"edgebuild x86-{rt}-int8"), p50.get(f"edgebuild x86-{rt}-fp32")
            if u8 and pr:
                row(f"{kind}: {rt} pruned-50% int8 <= 0.5x the latency of unpruned int8", f"{pr / u8:.2f}x", pr / u8 <= 0.5)
            if u8 and pf:
                row(f"{kind}: {rt} int8 vs fp32 latency ({'<= 0.5x' if rt == 'openvino' else '>= 2x faster'})",
                    f"{u8 / pf:.2f}x" if rt == "openvino" else f"{pf / u8:.2f}x faster", u8 / pf <= 0.5 if rt == "openvino" else pf / u8 >= 2)
        peak = _limit(res["limit"], "int8")
        for n, v in r.items():
            if n.startswith("edgebuild") and "int8" in n:
                rate = v["macs"] / (v["p50_ms"] / 1e3) / 1e9
                row(f"{kind}: {n} at >= 60% of the machine's int8 rate", f"{100 * rate / peak:.0f}%", rate / peak >= 0.6)
    d = res.get("digits", {})
    ft, fe = d.get("transfer_finetune"), d.get("transfer_features")
    if ft and fe:
        ratio = ft["mean_epoch_seconds"] / max(fe["mean_epoch_seconds"], 1e-9)
        row("digits: features-mode epochs >= 5x faster than finetune", f"{ratio:.0f}x", ratio >= 5)
    if "pruned" in d:
        ref = d["unpruned"]["fp32_reference_accuracy"] if "unpruned" in d else d["pruned"]["fp32_reference_accuracy"]
        for t, m in d["pruned"]["targets"].items():
            if "int8" in t and m.get("accuracy") is not None:
                row(f"digits: pruned-50% {t} within 1 point of the fp32 reference", f"{100 * (m['accuracy'] - ref):+.2f} points", m["accuracy"] >= ref - 0.01)
    rb = res.get("rebuild")
    if rb:
        row("digits: no-op rebuild under 3 s", f"{rb['noop_seconds']:.2f} s", rb["noop_seconds"] < 3)
        row("digits: no-op rebuild under 5% of a cold build", f"{100 * rb['noop_seconds'] / rb['cold_seconds']:.1f}%", rb["noop_seconds"] / rb["cold_seconds"] < 0.05)
        row("digits: one target's threads changed under 15% of a cold build", f"{100 * rb['threads_change_seconds'] / rb['cold_seconds']:.1f}%",
            rb["threads_change_seconds"] / rb["cold_seconds"] < 0.15)
    return out + [""]


def render_md(res: dict) -> str:
    lim = res["limit"]
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `{res['command']}` on {res['date']}. Do not edit by hand.",
        "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; Python {res['machine']['python']}, torch {res['machine']['torch']}, "
        f"ONNX Runtime {res['machine']['onnxruntime']}, OpenVINO {res['machine']['openvino']}. Batch 1, {THREADS} threads, warm-up then p50/p90 of timed runs.",
        "",
        f"Machine limit ({lim['method']}): fp32 {lim['fp32_gmacs']:.1f} GMAC/s, int8 {lim['int8_gmacs']:.1f} GMAC/s "
        f"({', '.join(f'{k} {v:.0f}' for k, v in lim['all'].items())}). " +
        (f"ISA peak ({lim['isa_peak']['assumes']}, {lim['isa_peak']['cores']} cores): fp32 {lim['isa_peak']['fp32_gmacs']:.0f} GMAC/s, "
         f"int8 {lim['isa_peak']['int8_gmacs']:.0f} GMAC/s. " if lim.get("isa_peak") else "") +
        f"'% of machine' divides an artifact's effective rate (its MACs / p50) by the larger of the two: "
        f"{_limit(lim, 'int8'):.0f} GMAC/s for int8 rows, {_limit(lim, 'fp32'):.0f} GMAC/s otherwise (convolutions reach more than "
        "a 1024-cube matmul does, so the measured matmul rate alone understates the machine).",
        "",
    ]
    hand_names = ["ONNX Runtime fp32", "ONNX Runtime int8 (quantize_static defaults)", "OpenVINO f32 forced", "OpenVINO default precision", "OpenVINO int8 (nncf.quantize defaults)"]
    for kind, data in res["models"].items():
        rows = data["rows"]
        eager = rows["PyTorch eager fp32"]["p50_ms"]
        best_hand = min(rows[n]["p50_ms"] for n in hand_names if n in rows)
        parts += [f"## {kind} (hf config, 224x224, random weights)", "", fmt_table(rows, eager, best_hand, lim), ""]
        best_eb = min((r["p50_ms"], n) for n, r in rows.items() if n.startswith("edgebuild"))
        parts += [f"Best edgebuild artifact: {best_eb[1]} at {best_eb[0]:.2f} ms = {eager / best_eb[0]:.1f}x PyTorch eager, "
                  f"{best_hand / best_eb[0]:.2f}x the best hand-written recipe ({best_hand:.2f} ms).", ""]
        parts += ["Build stage seconds (unpruned / pruned 30% / pruned 50%):", "", "```", json.dumps(data["build_stage_seconds"], indent=1), "```", ""]
    parts += targets_summary(res)
    d = res.get("digits", {})
    if d:
        parts += ["## Digits example: accuracy of every artifact", "", "| build | target | accuracy | agreement | p50 ms | size kB |", "|---|---|---|---|---|---|"]
        for label in ("unpruned", "pruned"):
            if label not in d:
                continue
            parts.append(f"| {label} | fp32 PyTorch reference (transfer) | {d[label]['fp32_reference_accuracy']:.4f} | - | - | - |")
            for t, m in d[label]["targets"].items():
                acc = f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else "not run"
                agr = f"{m['agreement']:.4f}" if m.get("agreement") is not None else "-"
                lat = f"{m['latency_p50_ms']:.3f}" if m.get("latency_p50_ms") is not None else "-"
                parts.append(f"| {label} | {t} | {acc} | {agr} | {lat} | {m['size_bytes'] / 1e3:.0f} |")
        parts.append("")
        for label in ("unpruned", "pruned"):
            if label in d:
                parts += [f"Digits {label} build: {d[label]['wall_seconds']:.1f} s cold; stage seconds:", "", "```", json.dumps(d[label]["stage_seconds"], indent=1), "```", ""]
        ft, fe = d.get("transfer_finetune"), d.get("transfer_features")
        if ft and fe:
            parts += [f"Transfer epoch time on digits: finetune {ft['mean_epoch_seconds']:.3f} s/epoch, features {fe['mean_epoch_seconds']:.4f} s/epoch "
                      f"({ft['mean_epoch_seconds'] / max(fe['mean_epoch_seconds'], 1e-9):.0f}x faster; features mode also spends "
                      f"{fe['feature_seconds']:.2f} s once to compute the features). Val accuracy: finetune {ft['val_accuracy']:.4f}, features {fe['val_accuracy']:.4f}.", ""]
    rb = res.get("rebuild")
    if rb:
        parts += ["## Rebuilds (digits example, `edgebuild build` as a user runs it, wall time incl. start-up)", "",
                  "| build | seconds | share of cold |", "|---|---|---|",
                  f"| cold (empty cache) | {rb['cold_seconds']:.2f} | 100% |",
                  f"| no-op rebuild (best of 3) | {rb['noop_seconds']:.2f} | {100 * rb['noop_seconds'] / rb['cold_seconds']:.1f}% |",
                  f"| one target's threads changed | {rb['threads_change_seconds']:.2f} | {100 * rb['threads_change_seconds'] / rb['cold_seconds']:.1f}% |", ""]
    edge = ROOT / "benchmarks" / "edge.json"
    if edge.is_file():  # written by python -m benchmarks.edge (the edge runtimes and emulation)
        from .edge import render_section

        parts += render_section(json.loads(edge.read_text()))
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.exit(main())
