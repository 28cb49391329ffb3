"""Search: per target (or group of targets that share an artifact), the fastest candidate that
meets every budget of the build.

A candidate is a prune setting (global ratio or per-stage ratios, importance, scope) and a
precision for the target's runtime (fp32, fp16 on OpenVINO, int8, and int8 with the first conv
and head in float: the accuracy guard's mixed option). For each:

1. cheap proxy: prune the model, recalibrate BatchNorm statistics on training images, export
   and quantize it for the target, and score the artifact on a held-out part of val;
2. latency p50/p90, size and MACs of that artifact on the target's real runtime, with the
   profile's threads and batch. A target this host cannot run is measured on the same runtime's
   host CPU and labelled ``estimate``;
3. successive halving: the fastest Pareto-front candidates (latency against proxy accuracy)
   that meet the latency and size budgets get full recovery (the prune stage itself, fine-tuning
   with distillation, so the final build reuses it) and a final accuracy on the whole val set,
   ``finalists`` at a time, until one meets the accuracy budget.

Every measurement is a cache entry: Ctrl-C keeps what is measured and a rerun resumes. The
result is ``dist/search.json``; the build then runs with each target's chosen candidate.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from ..lazy import torch, nn, no_grad

from ..cache import make_key
from ..config import PruneConfig
from ..errors import GateFailed
from ..metrics import count_macs, count_params
from ..profiles import unavailable_reason
from ..runtimes import adapter, open_runner
from . import export as export_stage
from . import prune as prune_stage
from . import validate as validate_stage

NAME = "search"
VERSION = 1


# ----------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------


def precisions(sc, prof) -> list[str]:
    have = ["fp32", "int8", "int8-float-ends"] + (["fp16"] if prof.runtime == "openvino" else [])
    return [p for p in (sc.precisions or have) if p in have]


def candidates(cfg, prof) -> list[dict]:
    """Every candidate of the space for one profile, cheapest-to-try first, at most max_candidates."""
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
        for prec in precisions(sc, prof):
            c = {"prune": p, "precision": prec}
            k = json.dumps(c, sort_keys=True)
            if k not in seen:
                seen.add(k)
                out.append(c)
    return out[: sc.max_candidates]


def prune_config(cfg, c: dict, recover_epochs: int) -> PruneConfig | None:
    p = c["prune"]
    if p["ratio"] == 0 and not p["stage_ratios"]:
        return None
    base = cfg.compress.prune or PruneConfig()
    return base.model_copy(update={**p, "recover_epochs": recover_epochs})


def label(c: dict) -> str:
    p = c["prune"]
    what = "unpruned" if p["ratio"] == 0 and not p["stage_ratios"] else (
        f"prune {p['ratio']:.0%}" if not p["stage_ratios"] else "prune " + ",".join(f"{k}:{v:.0%}" for k, v in p["stage_ratios"].items()))
    extra = f" {p['importance']}/{p['scope']}" if what != "unpruned" else ""
    return f"{what}{extra} {c['precision']}"


# ----------------------------------------------------------------------------------------------
# Measuring one candidate
# ----------------------------------------------------------------------------------------------


@no_grad
def recalibrate_bn(model: nn.Module, X: np.ndarray, batch: int = 32) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on ``X`` (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for b in range(0, len(X), batch):
        model(torch.as_tensor(X[b : b + batch]))
    return model.eval()


def proxy_model(base: nn.Module, c: dict, align: int, head: str | None, data, example: torch.Tensor, recal: np.ndarray, batch_size: int) -> nn.Module:
    m = copy.deepcopy(base).cpu().eval()
    p = c["prune"]
    if p["ratio"] == 0 and not p["stage_ratios"]:
        return m
    prune_stage.prune_model(m, example, ratio=p["ratio"], importance=p["importance"], scope=p["scope"], head=head, align=align,
                            grad_data=(data.Xtrain, data.ytrain), batch_size=min(batch_size, 64), ratio_dict=p["stage_ratios"] or None)
    return recalibrate_bn(m, recal)


def artifact(model: nn.Module, example: torch.Tensor, prof, precision: str, calib: np.ndarray, out: Path) -> str:
    """Export (and quantize) ``model`` for ``prof`` into ``out``; returns the precision to run it at."""
    eprof = prof.model_copy(update={"precision": "fp16" if precision == "fp16" else "fp32"})
    src = out / "export"
    src.mkdir()
    export_stage.run(model, example, eprof, src)
    if not precision.startswith("int8"):
        for f in export_stage.model_files(eprof):
            shutil.move(str(src / f), str(out / f))
        return precision
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


def pareto(rows: list[dict], acc_key: str = "proxy_accuracy") -> list[int]:
    """Indices of rows no other row beats on both latency (lower) and accuracy (higher)."""
    front = []
    for i, r in enumerate(rows):
        if not any((o["p50_ms"] <= r["p50_ms"] and o[acc_key] >= r[acc_key]) and (o["p50_ms"] < r["p50_ms"] or o[acc_key] > r[acc_key])
                   for o in rows):
            front.append(i)
    return front


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def groups(profiles: dict) -> dict[tuple, list[str]]:
    out: dict[tuple, list[str]] = {}
    for name, p in profiles.items():
        out.setdefault((p.runtime, p.format, p.device, p.arch, str(p.batch), p.threads, p.opset, p.align), []).append(name)
    return out


def run(b, bstep, bdir: Path, bmeta: dict, base_accuracy: float, example: torch.Tensor) -> list:
    """Search every target group; sets ``b.profiles`` precision and ``b.prune_for``; writes
    dist/search.json; returns the build's new plan."""
    cfg, data, sc = b.cfg, b.data(), b.cfg.compress.search
    t_end = time.monotonic() + sc.minutes * 60
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(data.yval))
    hold = np.sort(perm[: max(1, int(round(len(perm) * sc.holdout)))])
    recal = data.Xtrain[np.sort(rng.permutation(len(data.ytrain))[: sc.recalibration_samples])]
    from ..data import calibration_indices

    calib = data.Xtrain[calibration_indices(data.ytrain, cfg.compress.quantize.calibration_samples, cfg.seed)]
    recover = sc.recover_epochs if sc.recover_epochs is not None else ((cfg.compress.prune.recover_epochs if cfg.compress.prune else None) or 2)
    base_model = b._torch_model(bstep, bdir)
    report = {"schema": "edgebuild.search/1", "base_accuracy": base_accuracy, "holdout": {"fraction": sc.holdout, "samples": int(len(hold))},
              "recover_epochs": recover, "space": sc.model_dump(), "groups": []}
    out_path = b.out / "search.json"
    try:
        for key, names in groups(b.profiles).items():
            prof = b.profiles[names[0]]
            budgets = validate_stage.merged_budgets(prof, cfg.budgets)
            g = _search_group(b, prof, names, budgets, bstep, bdir, base_model, bmeta, base_accuracy, data, example, hold, recal, calib, recover, t_end)
            report["groups"].append(g)
            _write(out_path, report)
            if g["chosen"] is None:
                rows = sorted(g["candidates"], key=lambda r: -(r.get("final_accuracy") if r.get("final_accuracy") is not None else r["proxy_accuracy"]))[:5]
                raise GateFailed(f"search: no candidate for {', '.join(names)} meets the budgets ({len(g['candidates'])} measured); "
                                 "dist/search.json lists them; the closest:",
                                 [(", ".join(names), r["label"], json.dumps({k: v for k, v in budgets.items()}),
                                   f"acc {r.get('final_accuracy') or r['proxy_accuracy']:.4f} p90 {r['p90_ms']:.3f} ms {r['size_bytes'] / 1e6:.3f} MB")
                                  for r in rows], hint="relax a budget, widen compress.search, or raise max_candidates/minutes")
            chosen = g["candidates"][g["chosen"]]
            for n in names:
                b.profiles[n] = b.profiles[n].model_copy(update={"precision": "int8" if chosen["precision"].startswith("int8") else chosen["precision"]})
                b.prune_for[n] = prune_config(cfg, chosen, recover)  # None: unpruned
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


def _write(path: Path, report: dict) -> None:
    from ..publish import write_atomic  # a unique temporary name: two builds never share one

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=2, default=str))


def _search_group(b, prof, names, budgets, bstep, bdir, base_model, bmeta, base_acc, data, example, hold, recal, calib, recover, t_end) -> dict:
    cfg, sc, log = b.cfg, b.cfg.compress.search, b.progress.log
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
                                     "bench": sc.benchmark_seconds, "seed": cfg.seed}, {"model": bstep.key, "data": data.fingerprint})

        def build(out, c=c):
            r = _proxy(prof, c, base_model, bmeta, data, example, hold, recal, calib, cfg.transfer.batch_size, sc.benchmark_seconds)
            (out / "result.json").write_text(json.dumps(r))
        entry, _ = b.cache.put(NAME, k, {"name": cfg.name, "target": names[0], "params": c, "inputs": {}}, build) \
            if b.cache.get(NAME, k) is None else (b.cache.get(NAME, k), None)
        r = {"label": label(c), **c, **json.loads((entry / "result.json").read_text()), "final_accuracy": None, "pareto": False, "chosen": False}
        rows.append(r)
        front = pareto(rows)
        log(f"  {r['label']:<36} p50 {r['p50_ms']:.3f} ms  proxy acc {r['proxy_accuracy']:.4f}  front: "
            + ", ".join(f"{rows[i]['label']} ({rows[i]['p50_ms']:.2f} ms, {rows[i]['proxy_accuracy']:.3f})" for i in sorted(front, key=lambda i: rows[i]['p50_ms'])))
    for i in pareto(rows):
        rows[i]["pareto"] = True
    chosen = _finalists(b, prof, rows, budgets, base_acc, bstep, bdir, data, example, calib, recover, t_end)
    corr = spearman([r["proxy_accuracy"] for r in rows if r["final_accuracy"] is not None], [r["final_accuracy"] for r in rows if r["final_accuracy"] is not None])
    g = {"targets": names, "profile": settings, "budgets": budgets, "candidates": rows, "chosen": chosen, "rank_correlation_proxy_final": corr,
         "finalists": sum(r["final_accuracy"] is not None for r in rows)}
    if chosen is not None:
        rows[chosen]["chosen"] = True
        c = rows[chosen]
        unpruned = sorted((r for r in rows if r["prune"]["ratio"] == 0 and not r["prune"]["stage_ratios"] and r["precision"] in ("int8", c["precision"])),
                          key=lambda r: r["precision"] != "int8")  # the unpruned int8 artifact first
        g["why"] = (f"{c['label']}: the fastest candidate (p50 {c['p50_ms']:.3f} ms, p90 {c['p90_ms']:.3f} ms) whose final accuracy "
                    f"{c['final_accuracy']:.4f} is within max_accuracy_drop {budgets.get('max_accuracy_drop')} of {base_acc:.4f}"
                    + (f" and that meets max_latency_ms {budgets['max_latency_ms']}" if "max_latency_ms" in budgets else "")
                    + (f" and max_size_mb {budgets['max_size_mb']}" if "max_size_mb" in budgets else "")
                    + (f"; {unpruned[0]['p50_ms'] / c['p50_ms']:.2f}x the speed of {unpruned[0]['label']}" if unpruned else "")
                    + (f"; latency is an {c['latency_source']}" if c["latency_source"] != "measured" else ""))
        log(f"  search chose {g['why']}")
    return g


def _proxy(prof, c, base_model, bmeta, data, example, hold, recal, calib, batch_size, seconds) -> dict:
    m = proxy_model(base_model, c, prof.align, bmeta.get("head"), data, example, recal, batch_size)
    with tempfile.TemporaryDirectory(prefix="edgebuild-search-") as tmp:
        art = Path(tmp)
        prec = artifact(m, example, prof, c["precision"], calib, art)
        r = measure(prof, art, prec, data.Xval[hold], data.yval[hold], seconds)
    return {"proxy_accuracy": r.pop("accuracy"), **r, "params": count_params(m), "macs": count_macs(m, example)}


def _meets(r: dict, budgets: dict) -> bool:
    return (("max_latency_ms" not in budgets or r["p90_ms"] <= budgets["max_latency_ms"])
            and ("max_size_mb" not in budgets or r["size_bytes"] / 1e6 <= budgets["max_size_mb"]))


def _finalists(b, prof, rows, budgets, base_acc, bstep, bdir, data, example, calib, recover, t_end) -> int | None:
    """Successive halving: full recovery for the fastest front candidates, a round at a time."""
    sc, log = b.cfg.compress.search, b.progress.log
    drop = budgets.get("max_accuracy_drop")
    order = sorted((i for i, r in enumerate(rows) if _meets(r, budgets)), key=lambda i: (not rows[i]["pareto"], rows[i]["p50_ms"]))
    for start in range(0, len(order), sc.finalists):
        batch = order[start : start + sc.finalists]
        for i in batch:
            rows[i]["final_accuracy"] = _final(b, prof, rows[i], bstep, bdir, data, example, calib, recover)
            log(f"  finalist {rows[i]['label']}: final accuracy {rows[i]['final_accuracy']:.4f} (proxy {rows[i]['proxy_accuracy']:.4f})")
        ok = [i for i in batch if drop is None or base_acc - rows[i]["final_accuracy"] <= drop + 1e-12]
        if ok:
            return min(ok, key=lambda i: rows[i]["p50_ms"])
        if time.monotonic() > t_end:
            log(f"  search: the {sc.minutes} min limit is reached during full recovery")
            break
    return None


def _final(b, prof, r, bstep, bdir, data, example, calib, recover) -> float:
    """Full recovery through the prune stage (cached: the final build reuses it), then the
    artifact's accuracy on the whole val set."""
    from . import distill as distill_stage

    cfg = b.cfg
    pc = prune_config(cfg, r, recover)
    if pc is None:
        model = b._torch_model(bstep, bdir)
    else:
        pstep = b.prune_step(pc, prof.align, bstep.key)
        pdir = b._stage(pstep, lambda out: prune_stage.run(prune_stage.with_prune(cfg, pc), data, b._torch_model(bstep, bdir),
                                                           json.loads((bdir / "meta.json").read_text()), prof.align, out, b.progress, example))
        model = prune_stage.load_model(distill_stage.student_config(cfg), pdir)
    with tempfile.TemporaryDirectory(prefix="edgebuild-search-") as tmp:
        art = Path(tmp)
        prec = artifact(model, example, prof, r["precision"], calib, art)
        mprof = prof if not unavailable_reason(prof) else prof.model_copy(update={"device": "CPU", "arch": "any"})
        return float((open_runner(mprof, art, prec).run(data.Xval).argmax(1) == data.yval).mean())
