"""`make mutants`: plant each known bug in turn and show that the tests catch it.

Each mutant is (id, what, file, exact old snippet, new snippet, tests). For every mutant the
source tree is copied once into a temporary folder (never edited in place), the snippet is
replaced there (it must occur exactly once, otherwise the run stops with 'mutant does not
apply': the code moved and the record needs refreshing), the listed tests run against the
copy, and the file is restored. A mutant is caught when those tests fail.

    python tests/mutants.py            # all
    python tests/mutants.py G1 C3      # some
    python tests/mutants.py --list
    python tests/mutants.py --check    # only check that every snippet still applies

Exit status: 0 when every mutant was caught and the unmutated baseline passes; 1 otherwise.

Note on G2: the guard compares ``drop <= budget + 1e-12``. Turning only ``<=`` into ``<`` while
keeping the 1e-12 tolerance changes nothing (a drop rounded to 6 decimals never equals
budget + 1e-12), so that mutant is equivalent and no test can catch it; G2 plants the strict
comparison without the tolerance, which a drop exactly equal to the budget catches.
O1 relies on this host's CPU defaulting to bf16 (AVX512-BF16/AMX), O2 on its CPU honouring an
f16 hint (FP16 capability); on CPUs without them both are equivalent there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PV = "tests/test_preprocess_values.py"
GUARD = "tests/test_guard.py"
KEYS = "tests/test_cache_keys.py"
CLAIMS = "tests/test_claims.py"

MUTANTS = [
    # ---- preprocessing values
    ("P1", "16-bit images clipped instead of scaled", "edgebuild/preprocess.py",
     "np.clip(np.round(arr / top * 255.0), 0, 255)", "np.clip(np.round(arr), 0, 255)",
     [f"{PV}::test_16bit_values_are_scaled_to_8bit", "tests/test_data.py::test_16bit_scaled_not_clipped"]),
    ("P2", "center-crop offset set to 0", "edgebuild/preprocess.py",
     "left, top = (nw - width) // 2, (nh - height) // 2", "left, top = 0, 0",
     [f"{PV}::test_center_crop_takes_the_middle_columns", f"{PV}::test_center_crop_takes_the_middle_rows"]),
    ("P3", "stretch: width pass nearest instead of bilinear", "edgebuild/preprocess.py",
     "img = img.resize((width, img.size[1]), Image.BILINEAR)", "img = img.resize((width, img.size[1]), Image.NEAREST)",
     [f"{PV}::test_stretch_upscale_matches_hand_bilinear"]),
    ("P4", "stretch: height pass nearest instead of bilinear", "edgebuild/preprocess.py",
     "img = img.resize((width, height), Image.BILINEAR)", "img = img.resize((width, height), Image.NEAREST)",
     [f"{PV}::test_stretch_upscale_matches_hand_bilinear"]),
    ("P5", "alpha composited over black instead of white", "edgebuild/preprocess.py",
     "(255, 255, 255, 255)", "(0, 0, 0, 255)",
     [f"{PV}::test_alpha_over_white_rgba", f"{PV}::test_alpha_over_white_la_and_palette"]),
    ("L1", "edgebuild's 50 M pixel limit not enforced (Pillow's ~89 M left to act)", "edgebuild/data.py",
     "if img.size[0] * img.size[1] > MAX_PIXELS:", "if img.size[0] * img.size[1] > 2 * MAX_PIXELS:",
     [f"{PV}::test_pixel_limit_between_edgebuild_and_pillow"]),
    # ---- the int8 accuracy guard
    ("G1", "guard ships attempt 0 instead of the chosen attempt", "edgebuild/stages/quantize.py",
     'adir = out / f".attempt-{chosen}"', 'adir = out / ".attempt-0"',
     [f"{GUARD}::test_plain_fails_first_remedy_passes_and_ships"]),
    ("G2", "guard budget check '<=' made strict '<' (see note: with the 1e-12 tolerance kept, '<' is equivalent)",
     "edgebuild/stages/quantize.py",
     'ok &= rec["drop"] <= limits["max_accuracy_drop"] + 1e-12',
     'ok &= rec["drop"] < limits["max_accuracy_drop"]',
     [f"{GUARD}::test_plain_fails_first_remedy_passes_and_ships"]),
    ("G3", "guard scores the fp32 file instead of the int8 attempt", "edgebuild/stages/quantize.py",
     '_measure(rec, host_logits(profile, adir, "int8", Xval), yval, ref_pred, base)',
     '_measure(rec, host_logits(profile, src, "fp32", Xval), yval, ref_pred, base)',
     [f"{GUARD}::test_plain_fails_first_remedy_passes_and_ships"]),
    ("G4", "fallback 'fail' keeps the worst attempt (max -> min)", "edgebuild/stages/quantize.py",
     'chosen = max(usable, key=lambda i: (attempts[i].get("agreement", 0.0), attempts[i]["accuracy"])',
     'chosen = min(usable, key=lambda i: (attempts[i].get("agreement", 0.0), attempts[i]["accuracy"])',
     [f"{GUARD}::test_fail_fallback_keeps_the_best_attempt"]),
    # ---- cache invalidation
    ("C1", "data fingerprint dropped from the transfer key", "edgebuild/pipeline.py",
     'tinputs = {**self._backbone_inputs(), "data": data.fingerprint, "torch": pv["torch"]}',
     'tinputs = {**self._backbone_inputs(), "torch": pv["torch"]}',
     [f"{KEYS}::test_data_change_invalidates"]),
    ("C2", "weights keyed by path instead of content", "edgebuild/pipeline.py",
     'inputs["weights"] = sha256_file(w) if w.is_file() else "missing"', 'inputs["weights"] = str(w) if w.is_file() else "missing"',
     [f"{KEYS}::test_weights_change_invalidates"]),
    ("C3", "backbone code dropped from the key", "edgebuild/pipeline.py",
     'inputs["backbone_code"] = sha256_file(p)', 'inputs["backbone_code"] = str(p)',
     [f"{KEYS}::test_backbone_code_change_invalidates"]),
    ("C4", "preprocess settings dropped from the transfer key", "edgebuild/pipeline.py",
     'tparams = {"transfer": cfg.transfer.model_dump(), "preprocess": cfg.preprocess.model_dump(), "seed": cfg.seed,',
     'tparams = {"transfer": cfg.transfer.model_dump(), "seed": cfg.seed,',
     [f"{KEYS}::test_preprocess_settings_change_invalidates"]),
    ("C5", "preprocess.py code dropped from the data fingerprint", "edgebuild/dataset.py",
     '.encode() + f"preprocess:{code}\\n".encode()).hexdigest()', '.encode()).hexdigest()',
     [f"{KEYS}::test_preprocess_code_change_invalidates"]),
    ("C6", "cache entries written without their checksums (every read drops and rebuilds them)", "edgebuild/cache.py",
     '"describe": describe, "files": _checksums(tmp)}', '"describe": describe, "files": {}}',
     ["tests/test_build.py::test_corrupt_cache_entry_is_dropped_and_rebuilt"]),
    ("K1", "cache clear removes nothing", "edgebuild/cache.py",
     "                shutil.rmtree(stage_dir, ignore_errors=True)", "                pass",
     [f"{CLAIMS}::test_cache_ls_and_clear"]),
    ("F1", "--force ignored", "edgebuild/cli.py",
     "Cache(cache_dir, enabled=not force, wait=not no_wait)", "Cache(cache_dir, enabled=True, wait=not no_wait)",
     [f"{CLAIMS}::test_force_reruns_every_stage"]),
    ("S1", "SOURCE_DATE_EPOCH ignored", "edgebuild/pipeline.py",
     'bool(os.environ.get("SOURCE_DATE_EPOCH"))', "False",
     [f"{CLAIMS}::test_source_date_epoch_makes_bundles_reproducible"]),
    # ---- archives
    ("A1", "archive entries not sorted", "edgebuild/stages/bundle.py",
     'paths = sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())', 'paths = list(folder.rglob("*"))',
     ["tests/test_bundle.py::test_make_archive_entries_are_sorted"]),
    # ---- transfer
    ("W1", "warm-up trains the backbone too", "edgebuild/stages/transfer.py",
     "p.requires_grad_(id(p) in head_params)", "p.requires_grad_(True)",
     ["tests/test_transfer.py::test_warmup_epochs_recorded"]),
    # ---- validate gates and budgets
    ("V1", "accuracy-drop gate sign flipped", "edgebuild/stages/validate.py",
     'drop = base - metrics["accuracy"]', 'drop = metrics["accuracy"] - base',
     [f"{CLAIMS}::test_gates_fail_on_accuracy_drop_agreement_and_parity"]),
    ("V2", "min_agreement gate compares the wrong way", "edgebuild/stages/validate.py",
     'metrics["agreement"] >= budgets["min_agreement"]', 'metrics["agreement"] + 0.1 >= budgets["min_agreement"]',
     [f"{CLAIMS}::test_gates_fail_on_accuracy_drop_agreement_and_parity"]),
    ("V3", "parity gate never checked", "edgebuild/stages/validate.py",
     "tol = PARITY_TOLERANCE.get(precision)", 'tol = PARITY_TOLERANCE.get("int8")',
     [f"{CLAIMS}::test_gates_fail_on_accuracy_drop_agreement_and_parity"]),
    ("B1", "budgets: the profile default wins over the build file (the rule: the build file wins)", "edgebuild/budgets.py",
     'out[key] = {"value": b, "source": f"{BUILD} (profile default {p:g})"}', 'out[key] = {"value": p, "source": f"{BUILD} (profile default {p:g})"}',
     ["tests/test_budgets.py::test_build_file_loosens_a_profile_default"]),
    ("B2", "budgets: a hard device limit can be loosened by the build file", "edgebuild/budgets.py",
     "elif key in hard and _stricter(key, p, b) == p and p != b:", "elif False:",
     ["tests/test_budgets.py::test_hard_device_limit_is_tightened_never_loosened"]),
    # ---- runtimes
    ("O1", "OpenVINO inference precision not set (this host would run bf16)", "edgebuild/runtimes/openvino.py",
     'config = {"INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}',
     'config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}',
     [f"{CLAIMS}::test_openvino_fp16_and_int8_run_precision"]),
    ("O2", "OpenVINO fp16 computes in f16 on the CPU (the rule on main: f32 there)", "edgebuild/runtimes/openvino.py",
     'if precision == "fp16" and not device.startswith("CPU"):', 'if precision == "fp16":',
     [f"{CLAIMS}::test_openvino_fp16_and_int8_run_precision"]),
    # ---- torchrun
    ("D1", "ranks end with different weights (no broadcast of rank 0's state)", "edgebuild/distributed.py",
     "    if not active():\n        return\n    tensors = list(model.buffers())", "    return\n    tensors = list(model.buffers())",
     ["tests/test_distributed.py::test_every_rank_ends_with_the_same_weights"]),
]


class DoesNotApply(Exception):
    pass


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if not src.is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)


def run_tests(tree: Path, tests: list[str]) -> tuple[bool, float, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    env.pop("EDGEBUILD_CACHE_DIR", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *tests],
                       cwd=tree, env=env, capture_output=True, text=True)
    return r.returncode == 0, time.monotonic() - t0, r.stdout[-1500:] + r.stderr[-1500:]


def host_defaults_to_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for m in MUTANTS:
            print(f"{m[0]:<4} {m[1]}  [{m[2]}]")
        return 0
    check_only = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    chosen = [m for m in MUTANTS if not argv or m[0] in argv]
    with tempfile.TemporaryDirectory(prefix="edgebuild-mutants-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        r = subprocess.run([sys.executable, "-c", "import edgebuild; print(edgebuild.__file__)"], cwd=tree,
                           env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True)
        if not r.stdout.startswith(str(tree)):
            print(f"the copy's edgebuild is not the one imported: {r.stdout}{r.stderr}")
            return 1
        # every snippet must apply before anything runs
        stale = 0
        for mid, _, rel, old, new, _ in chosen:
            n = (tree / rel).read_text().count(old) if (tree / rel).is_file() else 0
            if n != 1:
                print(f"{mid}: mutant does not apply: {rel} has the snippet {n} times (the code moved; refresh the record)\n  {old!r}")
                stale += 1
        if stale:
            return 1
        if check_only:
            print(f"all {len(chosen)} mutants apply")
            return 0
        tests = sorted({t for m in chosen for t in m[5]})
        ok, secs, log = run_tests(tree, tests)
        print(f"baseline (no mutant): {len(tests)} tests {'pass' if ok else 'FAIL'} in {secs:.0f} s")
        if not ok:
            print(log)
            return 1
        rows = []
        for mid, what, rel, old, new, tests in chosen:
            if mid == "O1" and not host_defaults_to_bf16():
                print(f"{mid:<4} n/a: this CPU has no bf16, so an unset precision is f32 anyway (equivalent here)")
                continue
            path = tree / rel
            original = path.read_text()
            path.write_text(original.replace(old, new, 1))
            try:
                passed, secs, log = run_tests(tree, tests)
            finally:
                path.write_text(original)
            why = next((ln[2:].strip() for ln in log.splitlines() if ln.startswith("E ")), "")
            rows.append((mid, what, rel, "SURVIVED" if passed else "caught", secs))
            print(f"{mid:<4} {'SURVIVED' if passed else 'caught':<9} {secs:5.0f} s  {what}" + (f"\n       by: {why[:150]}" if why else ""), flush=True)
    print()
    print(f"| {'id':<4} | {'planted bug':<90} | {'file':<30} | result   |")
    print(f"|{'-' * 6}|{'-' * 92}|{'-' * 32}|----------|")
    for mid, what, rel, res, _ in rows:
        print(f"| {mid:<4} | {what[:90]:<90} | {rel:<30} | {res:<8} |")
    survived = [r[0] for r in rows if r[3] == "SURVIVED"]
    print(f"\n{len(rows) - len(survived)}/{len(rows)} mutants caught" + (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
