"""Search, QAT and distillation benchmarks (issue 16) on the textures example at 224x224.

    python examples/textures/make_example.py                 # the task-B images (once)
    python -m benchmarks.pretrain_textures --device cuda     # pretrained backbones (once)
    python -m benchmarks.search --models resnet18,mobilenetv2
    python -m benchmarks.search --models resnet18 --input-sizes 160,128 --precisions int8 --ratios 0,0.3,0.5 --tag "input sizes"
    python -m benchmarks.search --student                    # ResNet-18 teacher -> the textures example's small CNN
    python -m benchmarks.search --render                     # benchmarks/SEARCH.md from the recorded results

Per model, in one process and one cache, on the same data and targets (x86 ONNX Runtime int8 and
OpenVINO int8, batch 1, the profiles' 2 threads):

1. the hand-written recipe: ``edgebuild build`` with no search, the unpruned model quantized with
   the runtime's defaults (quantize_static / nncf.quantize), ``max_accuracy_drop: 0.01``: its
   manifest has the validated accuracy, the latency and, when PTQ loses more than the budget,
   every remedy the accuracy guard tried (QAT among them);
2. the same build with ``compress.search: {}`` (the default space), timed wall-clock: the
   search's own table (every candidate's p50/p90, proxy and final accuracy, Pareto front) and
   the chosen artifact's validated accuracy and latency.

The speed-up is the two bundles' validated p50 latencies, measured by the same harness in the
same process. The backbones come from benchmarks/pretrain_textures.py (task A, 8 other
classes); the teacher is transferred in ``features`` mode (frozen backbone, L-BFGS head).
Results: benchmarks/search-results.json and benchmarks/SEARCH.md; its "notes" list holds what the person who
recorded them saw (rendered as the caveats).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

from .run import machine_info

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "textures" / "data"
WEIGHTS = ROOT / "benchmarks" / ".work" / "textures-hf"
WORK = ROOT / "benchmarks" / ".work" / "search"
RESULTS = ROOT / "benchmarks" / "search-results.json"
TARGETS = ["x86-onnxruntime-int8", "x86-openvino-int8"]
TEXNET = ROOT / "examples" / "textures" / "backbone.py"  # the distillation benchmark's student (its own task-A weights)


def slug(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tag).strip("-")


def train_list(per_class: int) -> str:
    """The first ``per_class`` training images of each class as a CSV list (CPU training time
    bounds the benchmark: a MobileNetV2 fine-tunes at about 3 images/s at 224 on 2 cores)."""
    if per_class >= 400:
        return str(DATA / "train")
    WORK.mkdir(parents=True, exist_ok=True)
    lst = WORK / f"train-{per_class}.csv"
    rows = ["path,label"] + [f"{os.path.relpath(p, WORK)},{c.name}" for c in sorted((DATA / "train").iterdir()) if c.is_dir()
                             for p in sorted(c.glob("*.png"))[:per_class]]
    lst.write_text("\n".join(rows) + "\n")
    return str(lst)


def project(name: str, kind: str, extra: dict, per_class: int) -> Path:
    for p, hint in ((DATA / "train", "python examples/textures/make_example.py"), (WEIGHTS / kind / "model.safetensors", "python -m benchmarks.pretrain_textures")):
        if not p.exists():
            sys.exit(f"missing {p}: run {hint} first")
    cfg = {
        "name": name, "seed": 0,
        "backbone": {"source": f"hf:{WEIGHTS / kind}"},
        "data": {"train": train_list(per_class), "val": str(DATA / "val"), "test": str(DATA / "test")},
        "preprocess": {"input_size": [224, 224], "color": "rgb", "resize": "stretch", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "transfer": {"mode": "features", "epochs": 6, "batch_size": 32},
        "compress": {"distill": {"temperature": 4.0, "alpha": 0.5}, **extra},
        "targets": TARGETS,
        "budgets": {"max_accuracy_drop": 0.01},
    }
    d = WORK / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "edgebuild.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return d / "edgebuild.yaml"


def build(cfg_path: Path) -> dict:
    """One build as the CLI runs it (same process, shared cache); the bundles' manifests."""
    from edgebuild.cache import Cache
    from edgebuild.config import load_build_config
    from edgebuild.errors import GateFailed
    from edgebuild.pipeline import Build
    from edgebuild.progress import Progress

    out = cfg_path.parent / "dist"
    t0 = time.perf_counter()
    status = "ok"
    try:
        Build(load_build_config(cfg_path), None, out, Cache(WORK / "cache"), Progress("plain")).run()
    except GateFailed as e:
        status = f"exit 3: {e.message}"
    return {"status": status, "seconds": time.perf_counter() - t0, "dir": str(cfg_path.parent), **collect(cfg_path.parent)}


def collect(d: Path) -> dict:
    """What the build left in ``d/dist``: its report (``failed-report.json`` when the build
    failed a gate; nothing is published then), per target the validated figures and the
    quantization attempts, search.json and the teacher/student table."""
    out, res = d / "dist", {"bundles": {}}
    reports = [p for p in (out / "report.json", out / "failed-report.json") if p.is_file()]
    if not reports:
        return res
    rp = max(reports, key=lambda p: p.stat().st_mtime)
    rep = json.loads(rp.read_text())
    res["published"] = rp.name == "report.json"
    for t, tr in rep.get("targets", {}).items():
        met = tr.get("metrics") or {}
        res["bundles"][t] = {**{k: met.get(k) for k in ("accuracy", "test_accuracy", "latency_p50_ms", "latency_p90_ms", "size_bytes")},
                             "fp32_reference_accuracy": rep["transfer"]["val_accuracy"], "quantization": tr.get("quantization"),
                             "compression": tr.get("compression"), "input_size": tr.get("input_size"), "status": tr.get("status")}
    if (out / "search.json").is_file():
        res["search"] = json.loads((out / "search.json").read_text())
    res["distillation"] = rep.get("distillation")
    return res


def side_by_side(res: dict, rounds: int = 4, seconds: float = 3.0) -> None:
    """Each entry's recipe and searched bundles timed in this one process, alternating A/B
    rounds on the bundle's own runtime and self-test input (batch 1, the profile's threads):
    the speed-up without the drift between two builds' validate stages."""
    import numpy as np

    from edgebuild.runtimes import open_runner
    from edgebuild.verify import _manifest_profile

    for key, e in res.get("models", {}).items():
        e["side_by_side"] = {}
        for t in TARGETS:
            runners = []
            for part in ("recipe", "search"):
                folder = Path(e[part]["dir"]) / "dist" / f"{Path(e[part]['dir']).name}-{t}"
                if not (folder / "manifest.json").is_file():
                    break
                prof = _manifest_profile(json.loads((folder / "manifest.json").read_text()), str(folder))
                runners.append((open_runner(prof, folder), np.load(folder / "selftest.npz")["inputs"][:1]))
            if len(runners) < 2:
                continue
            p50 = {"recipe": [], "search": []}
            for _ in range(rounds):
                for part, (runner, x) in zip(("recipe", "search"), runners):
                    p50[part].append(runner.benchmark(x, max_seconds=seconds)["p50_ms"])
            r, s_ = float(np.median(p50["recipe"])), float(np.median(p50["search"]))
            e["side_by_side"][t] = {"recipe_p50_ms": r, "search_p50_ms": s_, "speedup": r / s_, "rounds": p50}
            print(f"{key} {t}: recipe {r:.3f} ms, searched {s_:.3f} ms, {r / s_:.2f}x", file=sys.stderr)


def refresh(res: dict) -> None:
    """Re-read every recorded build from its folder (its dist/ is the source of truth)."""
    for e in res.get("models", {}).values():
        for part in ("recipe", "search"):
            if (Path(e[part]["dir"]) / "dist").is_dir():
                e[part].update(collect(Path(e[part]["dir"])))
    st = res.get("student")
    if st and (WORK / "student" / "dist").is_dir():
        st.update(dir=str(WORK / "student"), **collect(WORK / "student"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenetv2")
    ap.add_argument("--student", action="store_true", help="the teacher/student benchmark instead (ResNet-18 -> MobileNetV2)")
    ap.add_argument("--train-per-class", type=int, default=100, help="training images per class (400: all)")
    ap.add_argument("--input-sizes", help="compress.search.input_sizes besides 224, e.g. 160,128 (square)")
    ap.add_argument("--ratios", help="compress.search.prune_ratios, e.g. 0,0.3,0.5 (default: the search's)")
    ap.add_argument("--precisions", help="compress.search.precisions, e.g. int8 (default: every one the runtime has)")
    ap.add_argument("--recover-epochs", type=int, help="compress.search.recover_epochs (default: the search's, 2)")
    ap.add_argument("--prune-lr", type=float, help="compress.prune.lr: the recovery's learning rate (default: transfer.lr, 0.01 with sgd)")
    ap.add_argument("--tag", help="the results entry is 'MODEL (TAG)' (a non-default space)")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--side-by-side", action="store_true", help="time every recipe/searched bundle pair again, alternating, in this process")
    opts = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    res = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not opts.render:
        res.setdefault("models", {})
        res.update({"date": datetime.date.today().isoformat(), "machine": machine_info(), "train_per_class": opts.train_per_class})
        if opts.student:
            dist = {"temperature": 4.0, "alpha": 0.5, "student": f"python:{TEXNET}:build", "student_weights": str(TEXNET.with_suffix(".safetensors")),
                    "student_classifier": "fc", "epochs": 6}
            cfg = project("student", "resnet18", {"distill": dist}, opts.train_per_class)
            res["student"] = {"command": f"python -m benchmarks.search --student --train-per-class {opts.train_per_class}", "train_per_class": opts.train_per_class, **build(cfg)}
            RESULTS.write_text(json.dumps(res, indent=1, default=str))
        space, args = {}, ""
        if opts.input_sizes:
            space["input_sizes"] = [[int(v), int(v)] for v in opts.input_sizes.split(",")]
            args += f" --input-sizes {opts.input_sizes}"
        if opts.ratios:
            space["prune_ratios"] = [float(v) for v in opts.ratios.split(",")]
            args += f" --ratios {opts.ratios}"
        if opts.precisions:
            space["precisions"] = opts.precisions.split(",")
            args += f" --precisions {opts.precisions}"
        prune = {}
        if opts.prune_lr is not None:
            prune = {"prune": {"lr": opts.prune_lr}}
            args += f" --prune-lr {opts.prune_lr}"
        if opts.recover_epochs is not None:
            space["recover_epochs"] = opts.recover_epochs
            args += f" --recover-epochs {opts.recover_epochs}"
        for kind in ([] if opts.student else opts.models.split(",")):
            key = kind + (f" ({opts.tag})" if opts.tag else "")
            print(f"== {key}: hand-written recipe", file=sys.stderr)
            entry = {"command": f"python -m benchmarks.search --models {kind} --train-per-class {opts.train_per_class}{args}" + (f" --tag '{opts.tag}'" if opts.tag else ""),
                     "train_per_class": opts.train_per_class, "space": space or "default",
                     "recipe": build(project(f"{kind}-recipe", kind, {}, opts.train_per_class))}
            print(f"== {key}: compress.search {space or '(default space)'}", file=sys.stderr)
            entry["search"] = build(project(f"{kind}-search" + ("-" + slug(opts.tag) if opts.tag else ""), kind, {"search": space, **prune}, opts.train_per_class))
            res["models"][key] = entry
            RESULTS.write_text(json.dumps(res, indent=1, default=str))
        RESULTS.write_text(json.dumps(res, indent=1, default=str))
    refresh(res)
    if opts.side_by_side:
        side_by_side(res)
    RESULTS.write_text(json.dumps(res, indent=1, default=str))
    (ROOT / "benchmarks" / "SEARCH.md").write_text(render(res))
    from .search_render import summary
    from .sections import replace_section

    replace_section(ROOT / "BENCHMARKS.md", "search", summary(res, TARGETS))
    return 0


def render(res: dict) -> str:
    from .search_render import render as r

    return r(res, TARGETS)


if __name__ == "__main__":
    sys.exit(main())
