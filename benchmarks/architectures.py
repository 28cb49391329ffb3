"""Foreign architectures through the whole build: which timm and torchvision models transfer,
prune 30%, quantize to int8 and validate on ONNX Runtime and OpenVINO, and what the others say.

    make .venv-providers/.installed   # the registry's torch, torchvision and timm (as make test-providers)
    .venv-providers/bin/python -m benchmarks.architectures timm:mobilevit_xxs,torchvision:googlenet
    .venv-providers/bin/python -m benchmarks.architectures --size 224 timm:deit_tiny_patch16_224
    .venv-providers/bin/python -m benchmarks.architectures --render   # benchmarks/ARCHITECTURES.md

Each model is built from random weights (nothing is downloaded) on 30 generated 3-class RGB
images (12 val), 1 finetune epoch, ``compress.prune: {ratio: 0.3, recover_epochs: 1}`` and
``budgets: {min_agreement: 0.0}``: a compatibility check of every stage, not an accuracy or speed
figure (latencies on a shared 2-core host mean little). A model that fails must fail with exit 2
and a message that names the cause; exit 1 (a traceback) is a bug. Results:
benchmarks/architectures.json (one row per model, the newest run of each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "architectures.json"


def make_images(folder: Path, counts: dict[str, int], size: int, seed: int) -> None:
    """Class folders of learnable RGB images: brightness per class, stripes on odd classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, (name, n) in enumerate(counts.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 50, size=(size, size)).astype(np.uint8) + np.uint8((ci * 67) % 200)
            if ci % 2:
                arr[::2, :] = 255 - arr[::2, :]
            Image.fromarray(arr, "L").convert("RGB").save(folder / name / f"img{i:03d}.png")


def build_one(source: str, size: int, work: Path) -> dict:
    root = work / source.replace(":", "-")
    shutil.rmtree(root, ignore_errors=True)
    make_images(root / "data" / "train", {"a": 10, "b": 10, "c": 10}, size + 8, seed=1)
    make_images(root / "data" / "val", {"a": 4, "b": 4, "c": 4}, size + 8, seed=2)
    (root / "edgebuild.yaml").write_text(
        f"name: arch\nseed: 0\nbackbone: {{source: '{source}'}}\n"
        "data: {train: data/train, val: data/val}\n"
        f"preprocess: {{input_size: [{size}, {size}], color: rgb, mean: [0.5], std: [0.25]}}\n"
        "transfer: {mode: finetune, epochs: 1, batch_size: 16, lr: 0.01}\n"
        "compress: {prune: {ratio: 0.3, recover_epochs: 1}, quantize: {calibration_samples: 16}}\n"
        "targets: [x86-onnxruntime-int8, x86-openvino-int8]\nbudgets: {min_agreement: 0.0}\n")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "edgebuild", "build", str(root / "edgebuild.yaml"), "-o", str(root / "dist"),
                            "--cache-dir", str(work / "cache")], capture_output=True, text=True, cwd=ROOT, timeout=900)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        rc, err = "timeout (900 s)", ""
    row = {"model": source, "size": size, "exit": rc, "seconds": round(time.time() - t0, 1)}
    errors = [line for line in err.splitlines() if line.startswith(("error:", "hint:"))]
    if rc != 0:
        row["message"] = errors or err.strip().splitlines()[-1:]
        return row
    report = json.loads((root / "dist" / "report.json").read_text())
    stages = {(s["stage"], s["target"]): s for s in report["stages"]}
    row["params"] = [stages[("transfer", "")]["params"], stages[("prune", "align 8")]["params"]]
    row["precision"] = {t: stages[("artifact", t)]["precision"] for t in ("x86-onnxruntime-int8", "x86-openvino-int8")}
    row["kept_automatically"] = report["compression"]["align 8"]["prune"].get("kept_automatically") or []
    return row


def render(rows: list[dict]) -> str:
    out = ["# Architectures through transfer, 30% pruning and int8", "",
           "`python -m benchmarks.architectures --render` from benchmarks/architectures.json; how each row was made is in",
           "benchmarks/architectures.py (random weights, 30 images, a compatibility check, not an accuracy figure).", "",
           f"{sum(r['exit'] == 0 for r in rows)} of {len(rows)} build every stage; {sum(r['exit'] == 2 for r in rows)} stop with exit 2 "
           f"with a message naming the cause; {sum(r['exit'] not in (0, 2) for r in rows)} otherwise (a traceback or a timeout would be a bug).", "",
           "| model | input | exit | params transfer -> pruned | ORT / OpenVINO | kept whole automatically | message |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["model"]):
        params = f"{r['params'][0] / 1e6:.2f}M -> {r['params'][1] / 1e6:.2f}M" if "params" in r else ""
        prec = " / ".join(r["precision"].values()) if "precision" in r else ""
        kept = f"{len(r['kept_automatically'])}" if r.get("kept_automatically") else ""
        msg = " ".join(r.get("message", []))[:220].replace("|", "\\|")
        out.append(f"| {r['model']} | {r['size']} | {r['exit']} | {params} | {prec} | {kept} | {msg} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="?", default="", help="comma-separated sources (timm:NAME, torchvision:NAME, hf:FOLDER)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "architectures")
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    rows = {(r["model"], r["size"]): r for r in (json.loads(RESULTS.read_text()) if RESULTS.exists() else [])}
    for source in filter(None, a.models.split(",")):
        row = build_one(source, a.size, a.work)
        print(json.dumps(row), flush=True)
        rows[(source, a.size)] = row
        RESULTS.write_text(json.dumps(sorted(rows.values(), key=lambda r: (r["model"], r["size"])), indent=1) + "\n")
    if a.render:
        from .sections import replace_section

        page = render(list(rows.values()))
        (ROOT / "benchmarks" / "ARCHITECTURES.md").write_text(page)
        replace_section(ROOT / "BENCHMARKS.md", "architectures", "## Architectures through every stage (timm, torchvision)\n\n"
                        + page.splitlines()[5] + " The table: benchmarks/ARCHITECTURES.md.")


if __name__ == "__main__":
    main()
