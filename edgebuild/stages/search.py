"""Search: per target (or group of targets that share an artifact), the fastest candidate that
meets every budget of the build.

A candidate is a prune setting (global ratio or per-stage ratios, importance, scope), an input
size (the build's, and ``input_sizes`` where the user allows others) and a precision for the
target's runtime (fp32, fp16 on OpenVINO, int8, and int8 with the first conv and head in float:
the accuracy guard's mixed option). For each:

1. cheap proxy: prune the model, recalibrate BatchNorm statistics on training images, export
   and quantize it for the target, and score the artifact on a held-out part of val, all on the
   images decoded at the candidate's input size (a model that cannot take that size gives a
   failed candidate, with the reason);
2. latency p50/p90, size and MACs of that artifact on the target's real runtime, with the
   profile's threads and batch. A target this host cannot run is measured on the same runtime's
   host CPU and labelled ``estimate``;
3. successive halving: the fastest Pareto-front candidates (latency against proxy accuracy)
   that meet the latency and size budgets get full recovery (the prune stage itself, fine-tuning
   with distillation, so the final build reuses it) and a final accuracy on the whole val set,
   ``finalists`` at a time, until one meets the accuracy budget.

Every measurement is a cache entry: Ctrl-C keeps what is measured and a rerun resumes. The
result is ``dist/search.json``; the build then runs with each target's chosen candidate (at
another input size, the target's whole chain uses that size: ``Build.target_cfg``).
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
from ..lazy import torch, nn

from ..cache import make_key
from ..config import PruneConfig
from ..errors import GateFailed
from ..metrics import count_macs, count_params
from ..profiles import unavailable_reason
from ..pruning import recalibrate_bn
from ..runtimes import adapter, open_runner
from ..search_stats import paired_drop, pareto, spearman  # noqa: F401 - public names of this stage
from . import export as export_stage
from . import prune as prune_stage
from . import transfer as transfer_stage
from . import validate as validate_stage

NAME = "search"
VERSION = 2  # 2: attention blocks and layers Torch-Pruning fails on kept whole


# ----------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------


def precisions(sc, prof) -> list[str]:
    have = ["fp32", "int8", "int8-float-ends"] + (["fp16"] if prof.runtime == "openvino" else [])
    return [p for p in (sc.precisions or have) if p in have]


def sizes(cfg) -> list[tuple[int, int]]:
    """The input sizes searched: the build's preprocess.input_size, then compress.search.input_sizes."""
    return list(dict.fromkeys([tuple(cfg.preprocess.input_size), *(tuple(s) for s in cfg.compress.search.input_sizes)]))


def resized(cfg, c: dict) -> Optional[tuple[int, int]]:
    """The candidate's input size where it is not the build's, else None."""
    size = tuple(c.get("input_size") or cfg.preprocess.input_size)
    return None if size == tuple(cfg.preprocess.input_size) else size


def candidates(cfg, prof) -> list[dict]:
    """Every candidate of the space for one profile, cheapest-to-try first, at most max_candidates.
    A candidate at another input size than the build's names it (``input_size``)."""
    sc, base = cfg.compress.search, cfg.compress.prune or PruneConfig()
    prunes = []
    for imp in sc.importance:
        for scope in sc.scope:
            for r in sc.prune_ratios:
                prunes.append({"ratio": float(r), "stage_ratios": {}, "importance": imp, "scope": scope})
            for d in sc.stage_ratios:
                prunes.append({"ratio": 0.0, "stage_ratios": dict(d), "importance": imp, "scope": scope})
    seen, out = set(), []
    for p in prunes:
        if p["ratio"] == 0 and not p["stage_ratios"]:
            p = {"ratio": 0.0, "stage_ratios": {}, "importance": base.importance, "scope": base.scope}  # unpruned: one candidate
        for size in sizes(cfg):
            for prec in precisions(sc, prof):
                c = {"prune": p, "precision": prec, **({"input_size": list(size)} if size != tuple(cfg.preprocess.input_size) else {})}
                k = json.dumps(c, sort_keys=True)
                if k not in seen:
                    seen.add(k)
                    out.append(c)
    return out[: sc.max_candidates]


def prune_config(cfg, c: dict, recover_epochs: int) -> PruneConfig | None:
    """The prune stage that makes the candidate's model: None for the unpruned model at the
    build's input size (at another size, recovery without pruning, at that size)."""
    p = c["prune"]
    if p["ratio"] == 0 and not p["stage_ratios"] and not resized(cfg, c):
        return None
    base = cfg.compress.prune or PruneConfig()
    return base.model_copy(update={**p, "recover_epochs": recover_epochs})


def label(c: dict, build_size=None) -> str:
    """e.g. 'prune 50% l2/uniform int8', and ' @160x160' where the input size is not the build's."""
    p = c["prune"]
    what = "unpruned" if p["ratio"] == 0 and not p["stage_ratios"] else (
        f"prune {p['ratio']:.0%}" if not p["stage_ratios"] else "prune " + ",".join(f"{k}:{v:.0%}" for k, v in p["stage_ratios"].items()))
    extra = f" {p['importance']}/{p['scope']}" if what != "unpruned" else ""
    size = c.get("input_size")
    at = f" @{size[0]}x{size[1]}" if size and (build_size is None or tuple(size) != tuple(build_size)) else ""
    return f"{what}{extra} {c['precision']}{at}"


# ----------------------------------------------------------------------------------------------
# Measuring one candidate
# ----------------------------------------------------------------------------------------------


def proxy_model(base: nn.Module, c: dict, align: int, head: str | None, data, example: torch.Tensor, recal: np.ndarray, batch_size: int,
                other_size: bool = False) -> nn.Module:
    """The candidate's model, cheaply: pruned, BatchNorm recalibrated on ``recal`` (images at the
    candidate's input size; at another size than the build's, an unpruned model is recalibrated too)."""
    m = copy.deepcopy(base).cpu().eval()
    p = c["prune"]
    if p["ratio"] == 0 and not p["stage_ratios"]:
        return recalibrate_bn(m, recal) if other_size else m
    prune_stage.prune_model(m, example, ratio=p["ratio"], importance=p["importance"], scope=p["scope"], head=head, align=align,
                            grad_data=(data.Xtrain, data.ytrain), batch_size=min(batch_size, 64), ratio_dict=p["stage_ratios"] or None)
    return recalibrate_bn(m, recal)


def artifact(model: nn.Module, example: torch.Tensor, prof, precision: str, calib: np.ndarray, out: Path) -> str:
    """Export (and quantize) ``model`` for ``prof`` into ``out``; returns the precision to run it at."""
    eprof = prof.model_copy(update={"precision": "fp16" if precision == "fp16" else "fp32"})
    if not precision.startswith("int8"):  # the export is the artifact: every file it writes, as the export stage keeps them
        export_stage.run(model, example, eprof, out)
        return precision
    src = out / "export"
    src.mkdir()
    export_stage.run(model, example, eprof, src)
    qprof = prof.model_copy(update={"precision": "int8"})
    adapter(prof.runtime).quantize(qprof, src, out, calib, {"float_layers": precision == "int8-float-ends"}, None)
    return "int8"


def measure(prof, art: Path, precision: str, X: np.ndarray, y: np.ndarray, seconds: float) -> dict:
    why = unavailable_reason(prof)
    mprof = prof if not why else prof.model_copy(update={"device": "CPU", "arch": "any"})
    runner = open_runner(mprof, art, precision)
    acc = float((runner.run(X).argmax(1) == y).mean()) if len(y) else 0.0
    bench = runner.benchmark(X[:1], warmup=5, min_iters=20, max_seconds=seconds)
    return {"accuracy": acc, "p50_ms": bench["p50_ms"], "p90_ms": bench["p90_ms"], "size_bytes": validate_stage.artifact_bytes(art, prof),
            "latency_source": "measured" if not why else f"estimate: {prof.runtime} on this host's CPU ({why})"}


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------


def groups(profiles: dict) -> dict[tuple, list[str]]:
    out: dict[tuple, list[str]] = {}
    for name, p in profiles.items():
        out.setdefault((p.runtime, p.format, p.device, p.arch, str(p.batch), p.threads, p.opset, p.align), []).append(name)
    return out


class Inputs(NamedTuple):
    """What measuring a candidate needs at one input size."""
    data: Any  # the splits decoded at that size
    example: Any  # a torch input of that size
    recal: np.ndarray  # train images for the BatchNorm recalibration
    calib: np.ndarray  # int8 calibration images


def run(b, bstep, bdir: Path, bmeta: dict, base_accuracy: float, example: torch.Tensor, base_hits: np.ndarray) -> list:
    """Search every target group; sets ``b.profiles`` precision, ``b.prune_for`` and
    ``b.size_for``; writes dist/search.json; returns the build's new plan. ``base_hits``: which val
    images the model the accuracy budget is measured against gets right (``base_accuracy`` is
    their mean); finalists' drops are paired with it image by image."""
    from ..data import calibration_indices

    cfg, data, sc = b.cfg, b.data(), b.cfg.compress.search
    t_end = time.monotonic() + sc.minutes * 60
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(data.yval))
    hold = np.sort(perm[: max(1, int(round(len(perm) * sc.holdout)))])
    recal_idx = np.sort(rng.permutation(len(data.ytrain))[: sc.recalibration_samples])
    calib_idx = calibration_indices(data.ytrain, cfg.compress.quantize.calibration_samples, cfg.seed)

    @functools.lru_cache(maxsize=None)
    def inputs(size: tuple) -> Inputs:
        """The same images (recalibration, calibration, held-out val) at ``size``."""
        d = data.at(size)
        return Inputs(d, example if d is data else transfer_stage.example_input(cfg.at_input_size(size)), d.Xtrain[recal_idx], d.Xtrain[calib_idx])

    recover = sc.recover_epochs if sc.recover_epochs is not None else ((cfg.compress.prune.recover_epochs if cfg.compress.prune else None) or 2)
    base_model = b._torch_model(bstep, bdir)
    report = {"schema": "edgebuild.search/1", "base_accuracy": base_accuracy, "holdout": {"fraction": sc.holdout, "samples": int(len(hold))},
              "recover_epochs": recover, "input_size": list(cfg.preprocess.input_size), "space": sc.model_dump(), "groups": []}
    out_path = b.out / "search.json"
    try:
        for key, names in groups(b.profiles).items():
            prof = b.profiles[names[0]]
            budgets = validate_stage.merged_budgets(prof, cfg.budgets)
            g = _search_group(b, prof, names, budgets, bstep, bdir, base_model, bmeta, base_hits, inputs, hold, recover, t_end)
            report["groups"].append(g)
            if g.get("warning"):
                report.setdefault("warnings", []).append(g["warning"])
            _write(out_path, report)
            if g["chosen"] is None:
                rows = sorted((r for r in g["candidates"] if not r.get("failed")), key=lambda r: -(r.get("final_accuracy") if r.get("final_accuracy") is not None else r["proxy_accuracy"]))[:5]
                raise GateFailed(f"search: no candidate for {', '.join(names)} meets the budgets ({len(g['candidates'])} tried); "
                                 "dist/search.json lists them; the closest:",
                                 [(", ".join(names), r["label"], json.dumps({k: v for k, v in budgets.items()}),
                                   f"acc {r.get('final_accuracy') or r['proxy_accuracy']:.4f} p90 {r['p90_ms']:.3f} ms {r['size_bytes'] / 1e6:.3f} MB")
                                  for r in rows], hint="relax a budget, widen compress.search, or raise max_candidates/minutes")
            chosen = g["candidates"][g["chosen"]]
            for n in names:
                b.profiles[n] = b.profiles[n].model_copy(update={"precision": "int8" if chosen["precision"].startswith("int8") else chosen["precision"]})
                b.prune_for[n] = prune_config(cfg, chosen, recover)  # None: unpruned
                if resized(cfg, chosen):
                    b.size_for[n] = resized(cfg, chosen)
    except KeyboardInterrupt:
        report["status"] = "interrupted: measured candidates are cached; run the build again to resume"
        _write(out_path, report)
        raise
    report["status"] = "ok"
    _write(out_path, report)
    b.search = report
    from ..plan import print_plan

    steps = b.plan()
    print_plan(b.progress, cfg.name, len(b.profiles), steps)
    return steps


def front(rows: list[dict], acc_key: str = "proxy_accuracy") -> list[int]:
    """Indices (into ``rows``) of the measured candidates on the Pareto front."""
    ok = [i for i, r in enumerate(rows) if not r.get("failed")]
    return [ok[j] for j in pareto([rows[i] for i in ok], acc_key)]


def _write(path: Path, report: dict) -> None:
    from ..publish import write_atomic  # a unique temporary name: two builds never share one

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=2, default=str))


def _search_group(b, prof, names, budgets, bstep, bdir, base_model, bmeta, base_hits, inputs, hold, recover, t_end) -> dict:
    cfg, sc, log = b.cfg, b.cfg.compress.search, b.progress.log
    base_acc = float(np.mean(base_hits))
    cands = candidates(cfg, prof)
    log(f"search [{', '.join(names)}]: {len(cands)} candidates, budgets {budgets}")
    rows: list[dict] = []
    settings = {"runtime": prof.runtime, "format": prof.format, "device": prof.device, "arch": prof.arch, "threads": prof.threads,
                "batch": prof.batch, "opset": prof.opset, "align": prof.align}
    for c in cands:
        if time.monotonic() > t_end:
            log(f"  search: the {sc.minutes} min limit is reached; {len(rows)} of {len(cands)} candidates measured")
            break
        k = make_key(NAME, VERSION, {"candidate": c, "profile": settings, "holdout": sc.holdout, "recal": sc.recalibration_samples,
                                     "bench": sc.benchmark_seconds, "seed": cfg.seed}, {"model": bstep.key, "data": b.data().fingerprint})

        def build(out, c=c):
            size = resized(cfg, c)
            r = _proxy(prof, c, base_model, bmeta, inputs(size or tuple(cfg.preprocess.input_size)), hold, cfg.transfer.batch_size,
                       sc.benchmark_seconds, size)
            (out / "result.json").write_text(json.dumps(r))
        entry, _ = b.cache.put(NAME, k, {"name": cfg.name, "target": names[0], "params": c, "inputs": {}}, build) \
            if b.cache.get(NAME, k) is None else (b.cache.get(NAME, k), None)
        r = {"label": label(c), **c, "input_size": list(resized(cfg, c) or cfg.preprocess.input_size),
             **json.loads((entry / "result.json").read_text()), "final_accuracy": None, "pareto": False, "chosen": False}
        rows.append(r)
        if r.get("failed"):
            log(f"  {r['label']:<36} failed: {r['failed']}")
            continue
        log(f"  {r['label']:<36} p50 {r['p50_ms']:.3f} ms  proxy acc {r['proxy_accuracy']:.4f}  front: "
            + ", ".join(f"{rows[i]['label']} ({rows[i]['p50_ms']:.2f} ms, {rows[i]['proxy_accuracy']:.3f})" for i in sorted(front(rows), key=lambda i: rows[i]['p50_ms'])))
    for i in front(rows):
        rows[i]["pareto"] = True
    chosen = _finalists(b, prof, rows, budgets, base_hits, bstep, bdir, inputs, recover, t_end)
    done = [r for r in rows if r["final_accuracy"] is not None]
    g = {"targets": names, "profile": settings, "budgets": budgets, "candidates": rows, "chosen": chosen,
         "rank_correlation_proxy_final": spearman([r["proxy_accuracy"] for r in done], [r["final_accuracy"] for r in done]),
         "finalists": len(done), "failed": sum(bool(r.get("failed")) for r in rows)}
    if chosen is not None:
        rows[chosen]["chosen"] = True
        c = rows[chosen]
        unpruned = sorted((r for r in rows if not r.get("failed") and r["prune"]["ratio"] == 0 and not r["prune"]["stage_ratios"] and not resized(cfg, r)
                           and r["precision"] in ("int8", c["precision"])), key=lambda r: r["precision"] != "int8")  # the unpruned int8 artifact first
        g["why"] = (f"{c['label']}: the fastest candidate (p50 {c['p50_ms']:.3f} ms, p90 {c['p90_ms']:.3f} ms) whose final accuracy "
                    f"{c['final_accuracy']:.4f} is within max_accuracy_drop {budgets.get('max_accuracy_drop')} of {base_acc:.4f} "
                    f"(drop {c['final_drop']:+.4f} ± {c['drop_ci95']:.4f} at 95% over {len(base_hits)} val images)"
                    + (f" and that meets max_latency_ms {budgets['max_latency_ms']}" if "max_latency_ms" in budgets else "")
                    + (f" and max_size_mb {budgets['max_size_mb']}" if "max_size_mb" in budgets else "")
                    + (f"; input {c['input_size'][0]}x{c['input_size'][1]} instead of the build's {cfg.preprocess.input_size[0]}x{cfg.preprocess.input_size[1]}"
                       if resized(cfg, c) else "")
                    + (f"; {unpruned[0]['p50_ms'] / c['p50_ms']:.2f}x the speed of {unpruned[0]['label']}" if unpruned else "")
                    + (f"; latency is an {c['latency_source']}" if c["latency_source"] != "measured" else ""))
        log(f"  search chose {g['why']}")
        if budgets.get("max_accuracy_drop") is not None and c["drop_ci95"] > budgets["max_accuracy_drop"]:
            g["warning"] = (f"search [{', '.join(names)}]: {len(base_hits)} val images resolve an accuracy drop only to ± {c['drop_ci95']:.4f} "
                            f"(95%), more than max_accuracy_drop {budgets['max_accuracy_drop']}: the chosen {c['label']}'s drop "
                            f"{c['final_drop']:+.4f} may not hold on new images; a test split (data.test) or a bigger val set checks it")
            log(f"  warning: {g['warning']}")
    return g


def _proxy(prof, c, base_model, bmeta, inp: Inputs, hold, batch_size, seconds, size=None) -> dict:
    """Proxy accuracy, latency, size and MACs of one candidate. At another input size than the
    build's, a model that cannot take it gives ``{"failed": reason}`` (the search goes on)."""
    try:
        m = proxy_model(base_model, c, prof.align, bmeta.get("head"), inp.data, inp.example, inp.recal, batch_size, other_size=size is not None)
        with tempfile.TemporaryDirectory(prefix="edgebuild-search-") as tmp:
            art = Path(tmp)
            prec = artifact(m, inp.example, prof, c["precision"], inp.calib, art)
            r = measure(prof, art, prec, inp.data.Xval[hold], inp.data.yval[hold], seconds)
    except Exception as e:  # noqa: BLE001 - any failure of the model at that size is the candidate's result
        if size is None:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return {"failed": f"the model does not take input {size[0]}x{size[1]}: {type(e).__name__}: {first}"}
    return {"proxy_accuracy": r.pop("accuracy"), **r, "params": count_params(m), "macs": count_macs(m, inp.example)}


def _meets(r: dict, budgets: dict) -> bool:
    return (("max_latency_ms" not in budgets or r["p90_ms"] <= budgets["max_latency_ms"])
            and ("max_size_mb" not in budgets or r["size_bytes"] / 1e6 <= budgets["max_size_mb"]))


def _finalists(b, prof, rows, budgets, base_hits, bstep, bdir, inputs, recover, t_end) -> int | None:
    """Successive halving: full recovery for the fastest front candidates, a round at a time.
    Each finalist's drop is paired image by image with ``base_hits``, with its 95% interval."""
    sc, log = b.cfg.compress.search, b.progress.log
    base_acc = float(np.mean(base_hits))
    drop = budgets.get("max_accuracy_drop")
    order = sorted((i for i, r in enumerate(rows) if not r.get("failed") and _meets(r, budgets)), key=lambda i: (not rows[i]["pareto"], rows[i]["p50_ms"]))
    for start in range(0, len(order), sc.finalists):
        batch = order[start : start + sc.finalists]
        for i in batch:
            hits = _final(b, prof, rows[i], bstep, bdir, inputs, recover)
            rows[i]["final_accuracy"] = float(hits.mean())
            rows[i]["final_drop"], rows[i]["drop_ci95"] = paired_drop(base_hits, hits)
            log(f"  finalist {rows[i]['label']}: final accuracy {rows[i]['final_accuracy']:.4f} (proxy {rows[i]['proxy_accuracy']:.4f}), "
                f"drop {rows[i]['final_drop']:+.4f} ± {rows[i]['drop_ci95']:.4f}")
        ok = [i for i in batch if drop is None or base_acc - rows[i]["final_accuracy"] <= drop + 1e-12]
        if ok:
            return min(ok, key=lambda i: rows[i]["p50_ms"])
        if time.monotonic() > t_end:
            log(f"  search: the {sc.minutes} min limit is reached during full recovery")
            break
    return None


def _final(b, prof, r, bstep, bdir, inputs, recover) -> np.ndarray:
    """Full recovery through the prune stage at the candidate's input size (cached: the final
    build reuses it), then which of the whole val set (at that size) the artifact gets right."""
    from . import distill as distill_stage

    cfg = b.cfg
    size = resized(cfg, r)
    inp = inputs(size or tuple(cfg.preprocess.input_size))
    pc = prune_config(cfg, r, recover)
    if pc is None:
        model = b._torch_model(bstep, bdir)
    else:
        pstep = b.prune_step(pc, prof.align, bstep.key, size)
        pdir = b._stage(pstep, b.prune_builder(pstep, bstep, bdir, json.loads((bdir / "meta.json").read_text())))
        model = prune_stage.load_model(distill_stage.student_config(cfg), pdir)
    with tempfile.TemporaryDirectory(prefix="edgebuild-search-") as tmp:
        art = Path(tmp)
        prec = artifact(model, inp.example, prof, r["precision"], inp.calib, art)
        mprof = prof if not unavailable_reason(prof) else prof.model_copy(update={"device": "CPU", "arch": "any"})
        return (open_runner(mprof, art, prec).run(inp.data.Xval).argmax(1) == inp.data.yval).astype(np.float64)
