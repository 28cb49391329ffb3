"""Accuracy per transfer mode and with augmentation on/off, on the textures example and its few-shot variant.

    python examples/textures/make_example.py               # the images (once)
    python -m benchmarks.transfer_accuracy               # every run; writes its section of BENCHMARKS.md
    python -m benchmarks.transfer_accuracy --runs fewshot-finetune-aug,fewshot-scratch-aug
    python -m benchmarks.transfer_accuracy --render      # the section again from the recorded results

Each run is ``edgebuild build`` of examples/textures/edgebuild.yaml (full: 400 training images per
class) or edgebuild-fewshot.yaml (20 per class) with only ``transfer.mode`` and
``transfer.augment`` changed, for the x86-onnxruntime-fp32 target, in a fresh cache. Runs are
recorded one by one in benchmarks/transfer_accuracy.json, so a long series can be split.
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
import time
from pathlib import Path

import yaml

from benchmarks.sections import replace_section

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "textures"
RESULTS = ROOT / "benchmarks" / "transfer_accuracy.json"
WORK = ROOT / "benchmarks" / ".work" / "transfer_accuracy"
VARIANTS = {"full": "edgebuild.yaml", "fewshot": "edgebuild-fewshot.yaml"}
MODES = [("finetune", True), ("finetune", False), ("features", False), ("scratch", True), ("scratch", False)]


def run_names() -> list[str]:
    return [f"{v}-{mode}-{'aug' if aug else 'noaug'}" for v in VARIANTS for mode, aug in MODES]


def variant_config(name: str, dest: Path) -> Path:
    variant, mode, aug = name.split("-")
    cfg = yaml.safe_load((EXAMPLE / VARIANTS[variant]).read_text())
    cfg["name"] = f"textures-{name}"
    src = cfg["backbone"]["source"].split(":")
    cfg["backbone"]["source"] = f"python:{EXAMPLE / src[1]}:{src[2]}"
    cfg["backbone"]["weights"] = str(EXAMPLE / cfg["backbone"]["weights"])
    for k in ("train", "val", "test"):
        if cfg["data"].get(k):
            cfg["data"][k] = str(EXAMPLE / cfg["data"][k])
    cfg["transfer"]["mode"] = mode
    cfg["transfer"]["augment"] = aug == "aug"
    cfg["targets"] = ["x86-onnxruntime-fp32"]
    cfg.pop("budgets", None)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "edgebuild.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest / "edgebuild.yaml"


def run_one(name: str) -> dict:
    dest = WORK / name
    shutil.rmtree(dest, ignore_errors=True)
    cfg_path = variant_config(name, dest)
    cmd = [sys.executable, "-m", "edgebuild", "build", str(cfg_path), "-o", str(dest / "dist"), "--cache-dir", str(dest / "cache"), "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name}: build failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    report = json.loads(p.stdout)
    cfg = yaml.safe_load(cfg_path.read_text())
    manifest = json.loads((dest / "dist" / f"{cfg['name']}-x86-onnxruntime-fp32" / "manifest.json").read_text())
    t = manifest["transfer"]
    variant, mode, aug = name.split("-")
    result = {
        "variant": variant, "mode": mode, "augment": aug == "aug",
        "train_per_class": 20 if variant == "fewshot" else 400, "epochs": cfg["transfer"]["epochs"],
        "val_accuracy": t.get("val_accuracy"), "test_accuracy": t.get("test_accuracy"), "best_epoch": t.get("best_epoch"),
        "transfer_seconds": (report.get("stage_seconds") or {}).get("transfer"), "build_wall_seconds": round(wall, 1),
    }
    shutil.rmtree(dest, ignore_errors=True)
    return result


def render(results: dict) -> str:
    lines = ["## Transfer accuracy: textures example (modes, augmentation, few-shot)", "",
             "The realistic example (`examples/textures`): 128x128 RGB procedural textures in clutter, a CNN pretrained",
             "here on 8 other texture classes, transferred to 6 new ones; val: 100 images per class. `full`: 400",
             "training images per class, `fewshot`: 20. Only `transfer.mode` and `transfer.augment` change between",
             "runs (epochs, lr, batch size as in the example's build files); fp32 PyTorch accuracy of the transfer",
             "stage. Scratch trains the same architecture from a random init. The best epoch is chosen on val; test",
             "(100 per class) is held out, so it is the fair figure. Chance is 0.167. The backbone is the committed",
             "`backbone.safetensors` (12 pretraining epochs, task-A held-out accuracy 0.858). Transfer seconds are",
             "wall time on a host that other jobs shared at times (the few-shot finetune runs most), so compare",
             "accuracies, not seconds.", "",
             f"Command: `{results.get('command', 'python -m benchmarks.transfer_accuracy')}` "
             f"({results.get('machine', '')}, {results.get('date', '')}).", "",
             "| data | mode | augment | epochs | val accuracy | test accuracy | transfer s |",
             "|---|---|---|---|---|---|---|"]
    for name in run_names():
        r = results["runs"].get(name)
        if not r:
            continue
        test = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "-"
        secs = f"{r['transfer_seconds']:.0f}" if r.get("transfer_seconds") is not None else "-"
        lines.append(f"| {r['variant']} ({r['train_per_class']}/class) | {r['mode']} | {'on' if r['augment'] else 'off'} | "
                     f"{r['epochs']} | {r['val_accuracy']:.4f} | {test} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(run_names()), help="comma-separated: " + ", ".join(run_names()))
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    opts = ap.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    if not opts.render:
        if not (EXAMPLE / "data" / ".generated").is_file():
            raise SystemExit("run python examples/textures/make_example.py first")
        for name in opts.runs.split(","):
            if name not in run_names():
                raise SystemExit(f"unknown run {name!r}; one of {', '.join(run_names())}")
            print(f"== {name}", file=sys.stderr, flush=True)
            results["runs"][name] = run_one(name)
            print(json.dumps(results["runs"][name]), file=sys.stderr, flush=True)
            results.update(date=datetime.date.today().isoformat(), command="python -m benchmarks.transfer_accuracy",
                           machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
            RESULTS.write_text(json.dumps(results, indent=2))
    replace_section(opts.out, "transfer_accuracy", render(results))
    print(f"wrote {opts.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
