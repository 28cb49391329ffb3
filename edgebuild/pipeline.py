"""Plans the stage graph for the chosen targets and runs it through the cache.

Shared stages (transfer, then prune+distill per channel alignment) run once; per-target
stages (export, quantize, validate, bundle) run once per target profile. Every stage key is
computed up front from its params and its inputs' keys, so the plan says before anything runs
which stages are cached and why the others run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import backbones, distributed
from .cache import Cache, make_key, sweep_stale
from .config import BuildConfig, PruneConfig, TargetProfile
from .data import calibration_indices, sha256_file
from .dataset import Data, prepare
from . import manifest as manifest_mod
from . import publish as publish_mod
from . import qat as qat_mod
from .locks import FileLock
from .errors import GateFailed
from .profiles import ProfileRegistry, check_input_fits, refuse_missing_extras, unavailable_reason, unavailable_reason_memo
from .runtimes import adapter
from .progress import Progress
from .stages import bundle as bundle_stage
from .stages import distill as distill_stage
from .stages import search as search_stage
from .stages import export as export_stage
from .stages import prune as prune_stage
from .stages import quantize as quantize_stage
from .stages import transfer as transfer_stage
from .stages import validate as validate_stage
from . import report_data
from .plan import Step, print_plan, plan_json, prune_label, why
from .plan import step as _step
from .target_run import build_target

CHANCE_MARGIN = 0.05  # a val accuracy this close to chance is a warning and a report flag


def _gate_hint(failed: list[dict]) -> str:
    """What the user can change: a profile default is overridden in the build file's budgets."""
    soft = [r for r in failed if "(default)" in r.get("source", "") or r.get("source", "").startswith("build file")]
    if soft:
        key = soft[0]["budget"].split(" ")[0]
        return (f"set budgets.{key} in the build file to change that limit (it overrides the profile's default), "
                "or change the model/compression; 'edgebuild targets show NAME' lists each profile's limits")
    return "change the model/compression (hard device limits and parity tolerances cannot be loosened by the build file)"


@dataclass
class BuildResult:
    report: dict
    bundles: list[Path] = field(default_factory=list)


class Build:
    def __init__(self, cfg: BuildConfig, targets: Optional[list[str]] = None, out: Optional[Path] = None,
                 cache: Optional[Cache] = None, progress: Optional[Progress] = None, targets_dirs: tuple = (),
                 reproducible: Optional[bool] = None, emulate: bool = False, remeasure: bool = False):
        self.cfg = cfg
        self.emulate = emulate  # validate foreign-arch targets under qemu-user (emulate.py)
        self.remeasure = remeasure  # validate again (latency, accuracy) with everything else cached
        # reproducible: bundles carry no host timings, so the same inputs give the same bytes
        # from a cold cache too (SOURCE_DATE_EPOCH set implies it, as in other build tools)
        self.reproducible = bool(os.environ.get("SOURCE_DATE_EPOCH")) if reproducible is None else reproducible
        self.out = Path(out) if out else cfg.root / "dist"
        self.cache = cache or Cache()
        self.progress = progress or Progress("quiet")
        dirs = [cfg.root / "targets", *[Path(d) for d in targets_dirs]]
        self.registry = ProfileRegistry(dirs)
        names = list(dict.fromkeys(targets or cfg.targets))
        self.profiles: dict[str, TargetProfile] = {}
        for n in names:
            self.profiles[n] = self.registry.get(n)
            check_input_fits(self.profiles[n], cfg.preprocess, self.registry.files.get(n))
            for size in (cfg.compress.search.input_sizes if cfg.compress.search else []):  # the search's other input sizes, too
                check_input_fits(self.profiles[n], cfg.at_input_size(size).preprocess, self.registry.files.get(n))
        refuse_missing_extras(self.profiles)
        if emulate and any(p.arch == "aarch64" for p in self.profiles.values()):
            from .emulate import check_host

            check_host()  # exit 2 with a hint before any work when qemu/debootstrap/binfmt are missing
        self._data: Optional[Data] = None
        self._force = not self.cache.enabled  # --force decodes the images again too
        self._models: dict[str, Any] = {}
        self.prune_for: dict[str, Any] = {}  # target -> the PruneConfig the search chose
        self.size_for: dict[str, tuple[int, int]] = {}  # target -> the input size the search chose, where not the build's
        self.search: Optional[dict] = None
        self.stage_times: dict[str, float] = {}
        self.step_seconds: dict[tuple[str, str], float] = {}  # (stage, key): seconds this build spent on it
        self.wait = True  # another build holding the output folder: wait (False: exit 2 naming it)
        self._out_lock = None

    # ------------------------------------------------------------------ inputs
    def data(self) -> Data:
        """The splits, fingerprinted; their images are decoded into the store on first use."""
        if self._data is None:
            self._data = prepare(self.cfg, self.cache.root, self.progress, rebuild=self._force and distributed.is_main())
        return self._data

    def target_cfg(self, name: str) -> BuildConfig:
        """The build file as one target's chain sees it: with the input size the search chose for it."""
        return self.cfg.at_input_size(self.size_for[name]) if name in self.size_for else self.cfg

    def data_for(self, name: str) -> Data:
        """The splits preprocessed at the target's input size."""
        return self.data().at(self.size_for[name]) if name in self.size_for else self.data()

    def _model_choice(self, name: str, align: int) -> tuple[Optional[PruneConfig], Optional[tuple], tuple]:
        """The prune setting and input size (None: the build's) a target's model is made with,
        and the key of that model (targets with the same key share it)."""
        pc, size = self.prune_for.get(name, self.cfg.compress.prune), self.size_for.get(name)
        if size is not None and pc is None:
            pc = PruneConfig()  # another input size: recovery at that size, without pruning
        return pc, size, (align, json.dumps(pc.model_dump(), sort_keys=True) if pc else None, size)

    def _features_key(self, data: Data) -> str:
        """What the frozen backbone's features depend on: images, preprocessing, backbone, torch."""
        cfg = self.cfg
        params = {"preprocess": cfg.preprocess.model_dump(), "source": cfg.backbone.source, "classifier": cfg.backbone.classifier,
                  "pretrained": cfg.backbone.pretrained, "batch": transfer_stage.FEATURE_BATCH}
        return make_key("features", transfer_stage.VERSION, params,
                        {**self._backbone_inputs(), "data": data.fingerprint, "torch": bundle_stage.pkg_version("torch")})

    def _backbone_inputs(self, cfg: Optional[BuildConfig] = None) -> dict:
        cfg = cfg or self.cfg
        inputs = {}
        scheme, _, ref = cfg.backbone.source.partition(":")
        if scheme == "python":
            target = ref.rpartition(":")[0]
            if target.endswith(".py"):
                p = cfg.resolve(target)
                if p.is_file():
                    inputs["backbone_code"] = sha256_file(p)
        elif scheme == "hf":
            d = cfg.resolve(ref)
            if d.is_dir():
                inputs["backbone_dir"] = make_key("dir", 1, {}, {f.name: sha256_file(f) for f in sorted(d.iterdir()) if f.is_file()})
        if cfg.backbone.weights:
            w = cfg.resolve(cfg.backbone.weights)
            inputs["weights"] = sha256_file(w) if w.is_file() else "missing"
        if cfg.transfer.mode != "scratch":  # the provider's own weights, from its cache (missing: exit 2 here)
            f = backbones.pretrained_file(cfg.backbone.source, cfg.root, cfg.backbone.pretrained)
            if f is not None and "backbone_dir" not in inputs:  # an hf folder is hashed whole above
                inputs["pretrained"] = sha256_file(f)
        return inputs

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[Step]:
        cfg = self.cfg
        data = self.data()
        steps: list[Step] = []
        pv = {p: bundle_stage.pkg_version(p) for p in manifest_mod.PACKAGES}
        tparams = {"transfer": cfg.transfer.model_dump(), "preprocess": cfg.preprocess.model_dump(), "seed": cfg.seed,
                   "source": cfg.backbone.source, "classifier": cfg.backbone.classifier}
        if cfg.backbone.pretrained is not None:  # absent when unset: existing cache keys stay valid
            tparams["pretrained"] = cfg.backbone.pretrained
        tinputs = {**self._backbone_inputs(), "data": data.fingerprint, "torch": pv["torch"]}
        transfer = base = _step(transfer_stage, "", tparams, tinputs)
        steps.append(transfer)
        if distill_stage.enabled(cfg):  # the transferred model teaches a student; everything after starts from it
            base = _step(distill_stage, "", distill_stage.params(cfg), distill_stage.inputs(self, transfer.key))
            steps.append(base)
        prune_steps: dict[tuple, Step] = {}  # per align and prune setting (the search picks one per target)
        for name, prof in self.profiles.items():
            pc, size, pk = self._model_choice(name, prof.align)
            if pc is not None and (pc.ratio > 0 or pc.stage_ratios or size) and pk not in prune_steps:
                prune_steps[pk] = self.prune_step(pc, prof.align, base.key, size)
                steps.append(prune_steps[pk])
        for name, prof in self.profiles.items():
            _, size, pk = self._model_choice(name, prof.align)
            model_step = prune_steps.get(pk, base)
            eparams = {"opset": prof.opset, "batch": prof.batch, "format": prof.format, "fp16_weights": prof.precision == "fp16",
                       **({"input_size": list(size)} if size else {})}
            rt = adapter(prof.runtime)
            einputs = {"model": model_step.key, "torch": pv["torch"], "onnx": pv["onnx"], "onnxscript": pv["onnxscript"],
                       "runtime": rt.versions()}
            export = _step(export_stage, name, eparams, einputs)
            steps.append(export)
            artifact = export
            if prof.precision == "int8":
                qparams = {"runtime": prof.runtime, "scheme": prof.quantization.model_dump(), "batch": prof.batch,
                           "samples": cfg.compress.quantize.calibration_samples, "seed": cfg.seed, "fallback": prof.fallback,
                           "max_accuracy_drop": validate_stage.merged_budgets(prof, cfg.budgets).get("max_accuracy_drop"),
                           "min_agreement": validate_stage.merged_budgets(prof, cfg.budgets).get("min_agreement"),
                           "min_accuracy": validate_stage.merged_budgets(prof, cfg.budgets).get("min_accuracy"),
                           "guard_baseline": transfer.key}
                qinputs = {"model": export.key, "data": data.fingerprint, "tool": rt.versions()}
                qat_mod.key_step(qparams, qinputs, cfg, prof, model_step.key)
                artifact = _step(quantize_stage, name, qparams, qinputs)
                steps.append(artifact)
            vparams = {"runtime": prof.runtime, "device": prof.device, "threads": prof.threads, "precision": prof.precision,
                       "arch": prof.arch, "available": self._unavailable(prof),
                       "emulate": self.emulate and prof.arch == "aarch64" and rt.emulatable and bool(self._unavailable(prof))}
            vinputs = {"artifact": artifact.key, "reference": model_step.key, "data": data.fingerprint,
                       "runtime": rt.versions()}
            steps.append(_step(validate_stage, name, vparams, vinputs))
        first: dict[tuple[str, str], str] = {}
        for s in steps:
            s.same_as = first.setdefault((s.stage, s.key), s.target) if s.target else ""
            s.same_as = "" if s.same_as == s.target else s.same_as
            s.entry = None if self.remeasure and s.stage == "validate" else self.cache.get(s.stage, s.key)
            s.cached = s.entry is not None
            s.reason = "cached" if s.cached else (f"same as {s.stage} [{s.same_as}]" if s.same_as else
                                                  "--remeasure" if self.remeasure and s.stage == "validate" else why(self.cache, s, self.cfg.name))
        return steps

    def prune_step(self, pc, align: int, model_key: str, size: Optional[tuple] = None) -> Step:
        cfg, pv = self.cfg, {p: bundle_stage.pkg_version(p) for p in ("torch", "torch-pruning")}
        pparams = {"prune": pc.model_dump(), "distill": cfg.compress.distill.model_dump() if cfg.compress.distill else None,
                   "align": align, "seed": cfg.seed, "batch_size": cfg.transfer.batch_size, "lr": pc.lr or cfg.transfer.effective_lr,
                   "weight_decay": cfg.transfer.weight_decay, "optimizer": cfg.transfer.optimizer,
                   "recover_epochs": pc.effective_recover_epochs(cfg.transfer.epochs), **({"input_size": list(size)} if size else {})}
        return _step(prune_stage, "", pparams, {"model": model_key, "data": self.data().fingerprint, "torch": pv["torch"], "torch-pruning": pv["torch-pruning"]})

    # ------------------------------------------------------------------ stage execution
    def _stage(self, step: Step, build: Callable[[Path], Any], shared: bool = False) -> Path:
        if shared and distributed.training():  # a training stage every rank of torchrun takes part in
            return distributed.run_shared(step.cached, lambda: self.cache.get(step.stage, step.key),
                                          lambda: self._build_stage(step, build), build)
        # the plan verified this entry already; otherwise an earlier step with the same key
        # (two targets sharing an export, say) may have built it during this run
        hit = step.entry if step.entry is not None and step.entry.is_dir() else self.cache.get(step.stage, step.key)
        if hit is not None:
            return hit
        return self._build_stage(step, build)

    def _build_stage(self, step: Step, build: Callable[[Path], Any]) -> Path:
        label = f"{step.stage}" + (f" [{step.target}]" if step.target else "") + (f" [{prune_label(step.params)}]" if step.stage == "prune" else "")
        self.progress.log(f"running {label}")
        t0 = time.perf_counter()
        describe = {"name": self.cfg.name, "target": step.target, "params": step.params, "inputs": step.inputs}
        path, _ = self.cache.put(step.stage, step.key, describe, build)
        self.stage_times[label] = time.perf_counter() - t0
        self.step_seconds[(step.stage, step.key)] = self.stage_times[label]
        return path

    def prune_builder(self, pstep: Step, bstep: Step, bdir: Path, bmeta: dict) -> Callable[[Path], Any]:
        """What builds a prune step's entry: pruning and recovery of the base model at the step's
        input size (the build's, or the one the search chose for its targets)."""
        def build(out: Path) -> None:
            pcfg = prune_stage.with_prune(self.cfg.at_input_size(pstep.params.get("input_size") or self.cfg.preprocess.input_size),
                                          PruneConfig(**pstep.params["prune"]))
            prune_stage.run(pcfg, self.data().at(pcfg.preprocess.input_size), self._torch_model(bstep, bdir), bmeta, pstep.params["align"], out,
                            self.progress, transfer_stage.example_input(pcfg))
        return build

    def _torch_model(self, step: Step, entry: Path):
        if step.key not in self._models:
            loader = {"prune": prune_stage.load_model, "distill": distill_stage.load_model}.get(step.stage, transfer_stage.load_model)
            self._models[step.key] = loader(distill_stage.student_config(self.cfg) if step.stage == "prune" else self.cfg, entry)  # a pruned student: the student's architecture
        return self._models[step.key]

    def run(self) -> BuildResult:
        try:
            return self._run()
        finally:
            if self._out_lock is not None:
                self._out_lock.release()

    def _lock_output(self) -> None:
        """Hold dist/.lock (one build writes an output folder at a time): wait for another
        holder, naming its PID, or exit 2 with --no-wait."""
        if self._out_lock is None:
            self._out_lock = FileLock(self.out / ".lock", f"output folder {self.out}", wait=self.wait).acquire()

    def _run(self) -> BuildResult:
        cfg = self.cfg
        t_build = time.perf_counter()
        if not distributed.is_main():  # under torchrun only rank 0 reads and writes the cache
            self.cache = Cache(self.cache.root, enabled=False)
        else:
            publish_mod.check_output(self.out)  # before any training, not after it
            self.cache.check_identity(create=True)  # a folder that is not an edgebuild cache is refused before training
            if self.out.is_dir():
                self._lock_output()
        steps = self.plan()
        distributed.sync_cached(steps)  # rank 0's cache decisions hold on every rank
        if all(s.cached for s in steps if not s.target) and distributed.end_of_training():
            return None  # a worker with nothing to train: the CLI waits for rank 0's exit status
        print_plan(self.progress, self.cfg.name, len(self.profiles), steps)
        data = self.data()
        by = {(s.stage, s.target): s for s in steps}
        # an example input (a torch tensor) for the stages that run; a fully cached rebuild needs
        # none, and then does not import torch at all
        fully_cached = all(s.cached for s in steps) and ("distill", "") not in by and cfg.compress.search is None
        example = None if fully_cached else transfer_stage.example_input(cfg)

        tstep = by[("transfer", "")]
        fcache = self.cache.root / "data" / "features" / self._features_key(data) if cfg.transfer.mode == "features" else None
        tdir = self._stage(tstep, lambda out: transfer_stage.run(cfg, data, out, self.progress, features_cache=fcache), shared=True)
        tmeta = json.loads((tdir / "meta.json").read_text())
        ref_logits = np.load(tdir / "val_logits.npy")
        fp32_acc = float(tmeta["val_accuracy"])
        warnings_: list[str] = []
        chance = tmeta.get("chance_accuracy")
        near_chance = chance is not None and fp32_acc <= chance + CHANCE_MARGIN
        if near_chance:
            warnings_.append(f"val accuracy {fp32_acc:.4f} is within {CHANCE_MARGIN:.2f} of chance ({chance:.4f}): the model has not learned the task; "
                             "check the labels, the lr (transfer.lr) and the number of epochs")
        calib_idx = calibration_indices(data.ytrain, cfg.compress.quantize.calibration_samples, cfg.seed)
        # the model each target starts from: the transferred one, or its pruned version per align
        models: dict[str, dict] = {tstep.key: {"step": tstep, "dir": tdir, "meta": tmeta, "ref_logits": ref_logits}}
        # the model pruning starts from: the transferred one or its student
        bstep, bdir, bmeta = distill_stage.in_build(self, by, tstep, tdir, tmeta, models, example) if ("distill", "") in by else (tstep, tdir, tmeta)
        if cfg.compress.search is not None and distributed.is_main():  # each target's candidate, then the plan again
            steps = search_stage.run(self, bstep, bdir, bmeta, fp32_acc, example, ref_logits.argmax(1) == data.yval)
            by = {(s.stage, s.target): s for s in steps}
            warnings_ += self.search.get("warnings", [])
        for pstep in (s for s in steps if s.stage == "prune"):
            pdir = self._stage(pstep, self.prune_builder(pstep, bstep, bdir, bmeta), shared=True)
            if not distributed.is_main():
                continue
            pmeta = json.loads((pdir / "meta.json").read_text())
            warnings_ += [w for w in pmeta.get("warnings", []) if w not in warnings_]
            models[pstep.key] = {"step": pstep, "dir": pdir, "meta": pmeta, "ref_logits": np.load(pdir / "val_logits.npy")}
        if distributed.end_of_training():
            return None  # a worker: training is over; the CLI waits for rank 0's exit status
        # the transfer model's latency is measured beside the pruned one's where there is one
        tlat = bmeta["teacher"]["host_latency"] if bstep is not tstep else next((m["meta"].get("host_latency_before") for m in models.values() if m["step"] is not tstep), None)
        stage_rows = [self._stage_row("transfer", "", tstep, tdir, tmeta, example, tlat)]
        stage_rows += [self._stage_row(m["step"].stage, prune_label(m["step"].params) if m["step"].stage == "prune" else f"student {bmeta['student']}",
                                       m["step"], m["dir"], m["meta"], example) for k, m in models.items() if k != tstep.key]
        self.distillation = distill_stage.side_by_side(bmeta) if bstep is not tstep else None

        targets_report = {}
        gate_rows = []
        staged = []
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock_output()
        sweep_stale(self.out, ".staging-")  # left by a build that was killed
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=self.out))
        try:
            for name, prof in self.profiles.items():
                r = build_target(self, name, prof, by, models, example, tmeta, fp32_acc, calib_idx, staging)
                gate_rows += r.gates
                staged.append(r.bundle_name)
                stage_rows.append(r.stage_row)
                targets_report[name] = r.report
            report = report_data.assemble(self, steps, tmeta, targets_report, time.perf_counter() - t_build)
            report["stages"] = stage_rows
            report["warnings"] = warnings_
            report["transfer"]["near_chance"] = near_chance
            report["data"] = data.record
            report["compression"] = {prune_label(m["step"].params): manifest_mod.compression(m["meta"]) for m in models.values() if m["step"].stage == "prune"} or None
            report["distillation"] = self.distillation
            report["search"] = self.search
            failed = [r for r in gate_rows if r["verdict"] == "FAIL"]
            if failed:
                report["status"] = "failed"
                where = publish_mod.write_failed_report(self.out, report_data.texts(report))
                raise GateFailed(
                    f"{len(failed)} budget or validation gate(s) failed; no bundle was written and the published {self.out} is unchanged;"
                    f" this build's report: {where}",
                    [(r["target"], r["budget"], str(r["limit"]), r.get("source", ""), str(r["measured"])) for r in failed],
                    hint=_gate_hint(failed),
                )
            report["status"] = "ok"
            bundles = publish_mod.publish(staging, staged, self.out,
                                          lambda folder, archive, name: bundle_stage.make_archive(folder, archive, name, previous=self.out / f"{name}.tar.gz"),
                                          lambda folder: report_data.write(folder, report))
            return BuildResult(report, bundles)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def _unavailable(self, prof: TargetProfile) -> str | None:
        """Why a profile cannot be validated here; remembered in the cache (a cached rebuild
        does not import every runtime to ask), probed afresh with --force or --remeasure."""
        if not self.cache.enabled or self.remeasure:
            return unavailable_reason(prof)
        return unavailable_reason_memo(prof, self.cache.root / "host-devices.json")

    def dry_run(self) -> list[dict]:
        """The plan, printed, without running anything."""
        steps = self.plan()
        print_plan(self.progress, self.cfg.name, len(self.profiles), steps)
        return plan_json(steps)

    def _stage_row(self, stage: str, label: str, step: Step, entry: Path, meta: dict, example, lat: dict | None = None) -> dict:
        """What one shared stage bought: params, MACs, file size, val accuracy, host latency."""
        lat = meta.get("host_latency") if lat is None else lat
        if lat is None:
            lat = prune_stage.torch_latency(self._torch_model(step, entry), example=transfer_stage.example_input(self.cfg) if example is None else example)[0]
        weights = entry / "model.safetensors"
        return {"stage": stage, "target": label, "precision": "fp32", "params": meta["params"], "macs": meta["macs"],
                "bytes": weights.stat().st_size if weights.is_file() else None, "val_accuracy": meta["val_accuracy"],
                "host_latency_p50_ms": lat["p50_ms"], "host_latency_p90_ms": lat["p90_ms"], "latency_runtime": lat.get("runtime"),
                "status": "measured"}
