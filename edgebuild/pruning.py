"""Structured channel pruning with Torch-Pruning: the library glue behind the prune stage.

``prune_model`` traces the model with Torch-Pruning's dependency graph and removes channels
physically (convolutions, batch norms, linears and everything coupled to them). Attention blocks
(a module with ``num_heads``, ``nn.MultiheadAttention``) keep their channels: their reshapes into
heads are not in the graph. A layer Torch-Pruning fails on, or after which the pruned model no
longer runs, is kept too and the model is pruned again from the original (at most
``AUTO_KEEP_TRIES`` times); the result lists every layer kept that way. A failure it cannot
place names the layer involved (a forward hook remembers the last one entered) and hints at
``compress.prune.keep``. The stage (``edgebuild.stages.prune``) adds recovery training,
saving and the figures; the search stage calls ``prune_model`` for its candidates.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Optional

import numpy as np
from .lazy import torch, nn, F

from .errors import ConfigError, ModelError, did_you_mean

IMPORTANCES = ("l1", "l2", "taylor")
SCOPES = ("global", "uniform")
AUTO_KEEP_TRIES = 16


class _Unprunable(Exception):
    """One pruning try failed; ``layer``: the layer to keep on the next try (None: not known)."""

    def __init__(self, error: ModelError, layer: Optional[str]):
        super().__init__(error.message)
        self.error, self.layer = error, layer


def attention_layers(model: nn.Module) -> list[str]:
    """Names of the attention blocks (outermost only): modules with an integer ``num_heads`` and
    ``nn.MultiheadAttention``."""
    out: list[str] = []
    for name, m in model.named_modules():
        if name and (isinstance(getattr(m, "num_heads", None), int) or isinstance(m, nn.MultiheadAttention)) \
                and not any(name.startswith(f"{o}.") for o in out):
            out.append(name)
    return out


def _failing_group_root(e: BaseException, names: dict) -> Optional[str]:
    """The root layer of the Torch-Pruning group being worked on when ``e`` was raised (from the
    ``group`` local of the library's frames), or None."""
    tb = e.__traceback__
    while tb is not None:
        g = tb.tb_frame.f_locals.get("group")
        try:
            name = names.get(g[0].dep.target.module) if g is not None else None
        except Exception:  # noqa: BLE001 - not a Torch-Pruning group
            name = None
        if name:
            return name
        tb = tb.tb_next
    return None


def resolve_layers(model: nn.Module, names: list[str], what: str = "prune.keep") -> list[nn.Module]:
    """The modules named in ``names`` (a leading ``model.`` of wrapped hf models is optional)."""
    modules = dict(model.named_modules())
    found = []
    for name in names:
        for cand in (name, f"model.{name}"):
            if cand and cand in modules:
                found.append(modules[cand])
                break
        else:
            layers = [n for n, m in modules.items() if n and not list(m.children())]
            raise ModelError(f"{what}: layer '{name}' not found in the model: {did_you_mean(name, layers)}",
                             hint="name a module as printed by print(model), e.g. 'features.0.0'")
    return found


class _LastModule:
    """Remembers the last leaf module entered during a forward pass, to name a failing layer."""

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.last: Optional[str] = None
        self.done = False
        leaves = [m for m in model.modules() if not list(m.children())]
        self.hooks = [m.register_forward_pre_hook(self._pre) for m in leaves] + [m.register_forward_hook(self._post) for m in leaves]

    def _pre(self, m, _inp):
        self.last, self.done = self.names.get(m), False

    def _post(self, m, _inp, _out):
        self.done = True

    def where(self) -> str:
        if not self.last:
            return "the model"
        return f"the operation right after layer '{self.last}'" if self.done else f"layer '{self.last}'"

    def close(self):
        for h in self.hooks:
            h.remove()


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ConfigError(f"compress.prune.importance '{kind}': {did_you_mean(kind, IMPORTANCES)}", hint="use l1, l2 or taylor")


def prune_model(
    model: nn.Module,
    example: torch.Tensor,
    *,
    ratio: float,
    importance: str = "l2",
    scope: str = "uniform",
    keep: tuple[str, ...] | list[str] = (),
    head: Optional[str] = None,
    align: int = 1,
    grad_data: Optional[tuple[np.ndarray, np.ndarray]] = None,
    grad_batches: int = 4,
    batch_size: int = 32,
    ratio_dict: Optional[dict[str, float]] = None,
) -> dict:
    """Prune ``model`` in place; returns what was done (ratio, kept layers, the layers kept
    automatically, channel counts).

    ``grad_data`` (X, y) gives the few batches of gradients Taylor importance needs.
    ``ratio_dict`` maps module names (a stage such as ``layer3``) to their own ratio.
    """
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"compress.prune.ratio = {ratio!r}: must be >= 0 and < 1", hint="e.g. ratio: 0.5 removes half the channels of each prunable layer")
    if scope not in SCOPES:
        raise ConfigError(f"compress.prune.scope '{scope}': {did_you_mean(scope, SCOPES)}", hint="use global or uniform")
    if int(align) < 1:
        raise ConfigError(f"align = {align!r}: must be >= 1", hint="set align in the target profile")
    imp = _importance(importance)
    kept_names = list(dict.fromkeys(([head] if head else []) + list(keep)))
    resolve_layers(model, [head] if head else [], "head") + resolve_layers(model, list(keep))  # names checked up front
    model.eval()
    if ratio == 0 and not ratio_dict:
        return {"ratio": 0.0, "importance": importance, "scope": scope, "align": int(align), "kept": kept_names, "layers_changed": {}}
    auto = [n for n in attention_layers(model) if n not in kept_names]
    pristine = copy.deepcopy(model)
    for _ in range(AUTO_KEEP_TRIES):
        try:
            info = _prune_once(model, example, ratio=float(ratio), imp=imp, importance=importance, scope=scope, keep=kept_names + auto,
                               align=align, grad_data=grad_data, grad_batches=grad_batches, batch_size=batch_size, ratio_dict=ratio_dict)
            return {**info, "kept": kept_names, "kept_automatically": auto}
        except _Unprunable as e:
            if not e.layer or e.layer in kept_names or e.layer in auto:
                raise e.error from e.__cause__
            auto.append(e.layer)
            fresh = copy.deepcopy(pristine).__dict__  # back to the original, in place: callers hold ``model``
            model.__dict__.clear()
            model.__dict__.update(fresh)
    raise ModelError(f"Torch-Pruning failed on {len(auto)} layers of this model, each kept in turn ({', '.join(auto[:6])}, ...)",
                     hint="prune a smaller ratio, list the layers that should keep their channels in compress.prune.keep, or remove compress.prune")


def _prune_once(model, example, *, ratio, imp, importance, scope, keep, align, grad_data, grad_batches, batch_size, ratio_dict) -> dict:
    """One try of :func:`prune_model` with ``keep`` (names) left whole; raises :class:`_Unprunable`."""
    import torch_pruning as tp

    ignored = resolve_layers(model, list(keep))
    before = _channels(model)
    names = {m: n for n, m in model.named_modules()}
    tracker = _LastModule(model)
    try:
        with _quiet():
            pruner = tp.pruner.BasePruner(
                model, example, importance=imp, pruning_ratio=float(ratio), global_pruning=scope == "global",
                ignored_layers=ignored, round_to=int(align) if align > 1 else None,
                pruning_ratio_dict={m: float(r) for m, r in zip(resolve_layers(model, list(ratio_dict), "compress.prune.stage_ratios"), ratio_dict.values())}
                if ratio_dict else None,
            )
    except Exception as e:
        # a layer's name only where the tracing forward stopped inside it; after a whole forward
        # (the graph is built from it) the last layer run is not the one at fault
        inside = tracker.last if tracker.last and not tracker.done else None
        where = f" at layer '{inside}'" if inside else _library_frame(e)
        err = ModelError(f"Torch-Pruning cannot trace the model{where}: {type(e).__name__}: {_first_line(e)}",
                         hint=f"add '{inside}' to compress.prune.keep, or remove compress.prune for this model" if inside else
                         "the model has an operation Torch-Pruning cannot follow (a channel shuffle, say): remove compress.prune for it, "
                         "or distill it into a student (compress.distill.student) and prune that")
        raise _Unprunable(err, None) from e  # the trace itself: keeping a layer does not change it
    finally:
        tracker.close()

    if importance == "taylor":
        if grad_data is None:
            raise ModelError("taylor importance needs training data for gradients", hint="use importance: l1 or l2")
        X, y = grad_data
        model.zero_grad(set_to_none=True)
        model.train()
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(X), generator=gen)
        for b in range(min(grad_batches, max(1, len(X) // batch_size + (len(X) % batch_size > 0)))):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            if len(idx) == 0:
                break
            loss = F.cross_entropy(model(torch.as_tensor(X[idx.numpy()])), torch.as_tensor(y[idx.numpy()]))
            loss.backward()
        model.eval()

    try:
        with _quiet():
            pruner.step()
    except Exception as e:
        layer = _failing_group_root(e, names)
        err = ModelError(f"Torch-Pruning failed to prune the model{f' at layer {layer!r}' if layer else ''}: {type(e).__name__}: {_first_line(e)}",
                         hint=f"add '{layer}' to compress.prune.keep" if layer else "add the failing layer to compress.prune.keep")
        raise _Unprunable(err, layer) from e
    model.zero_grad(set_to_none=True)
    try:
        check_forward(model, example)
    except ModelError as e:
        raise _Unprunable(e, getattr(e, "layer", None)) from e.__cause__
    after = _channels(model)
    changed = {n: [before[n], after[n]] for n in after if n in before and before[n] != after[n]}
    return {"ratio": float(ratio), **({"stage_ratios": dict(ratio_dict)} if ratio_dict else {}), "importance": importance, "scope": scope,
            "align": int(align), "layers_changed": changed}


def check_forward(model: nn.Module, example: torch.Tensor) -> None:
    tracker = _LastModule(model)
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:
        where = tracker.where()
        err = ModelError(f"the pruned model no longer runs: {where} failed: {type(e).__name__}: {_first_line(e)}",
                         hint=f"add '{tracker.last}' (or the layer feeding it) to compress.prune.keep" if tracker.last else "add the failing layer to compress.prune.keep")
        err.layer = tracker.last
        raise err from e
    finally:
        tracker.close()


def _channels(model: nn.Module) -> dict[str, int]:
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[n] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[n] = m.out_features
    return out


def _library_frame(e: BaseException) -> str:
    """`` (in Torch-Pruning's NAME)``: the library's innermost function in ``e``'s traceback."""
    import traceback

    names = [f.name for f in traceback.extract_tb(e.__traceback__) if "torch_pruning" in f.filename]
    return f" (in Torch-Pruning's {names[-1]})" if names else ""


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def recalibrate_bn(model: nn.Module, X: np.ndarray, batch: int = 32) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on ``X`` (a cumulative average over the
    batches; each layer's momentum is restored afterwards). Pruning leaves the statistics of the
    unpruned network behind; without this a pruned model starts recovery from chance level."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for b in range(0, len(X), batch):
            model(torch.as_tensor(X[b : b + batch]))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()
