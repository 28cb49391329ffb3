"""Export: the PyTorch model to the profile's format, through its runtime adapter.

The ONNX-based runtimes start from one self-contained ONNX file by ``torch.onnx.export``
(torch.export-based; input ``input``, NCHW float32, batch static or dynamic per profile; output
``logits``); OpenVINO IR is converted from that same file. This module holds that ONNX export
and the one-line error that names the failing op and module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
import warnings
from pathlib import Path

from ..lazy import torch, nn

from ..config import TargetProfile
from ..errors import ModelError

NAME = "export"
VERSION = 3  # 3: node metadata stripped (paths, module names)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _chain(err: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first (cycles cut)."""
    out: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and cur not in out and len(out) < 20:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _unsupported_op(err: BaseException) -> str | None:
    """The ATen op an export error is about ('aten._linalg_svd'), from any error in the chain."""
    pats = [r"OpOverload\(op='(aten\.[A-Za-z0-9_]+)'", r"torch\.ops\.(aten\.[A-Za-z0-9_]+)", r"(aten::[A-Za-z0-9_]+)", r"(aten\.[A-Za-z0-9_]+)"]
    texts = [_ANSI.sub("", str(e)) for e in _chain(err)]
    for pat in pats:
        for text in reversed(texts):  # the innermost error is the most specific
            m = re.search(pat, text)
            if m:
                return m.group(1).replace("::", ".")
    return None


def _op_base(name: str) -> str:
    name = name.replace("::", ".")
    if name.startswith("aten."):
        name = name[len("aten."):]
    return name.split(".")[0]


def _describe(model: nn.Module, path: str) -> str:
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        return f"'{path}'"
    return f"'{path}' ({type(mod).__name__})" if path else f"the top-level model ({type(mod).__name__})"


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' logging (guard warnings) and prints while exporting. What they
    print to stderr is passed on when the export succeeds and dropped when it fails (torch.export
    prints whole partial graphs then): a failure becomes one ModelError line, ``-v`` shows its chain."""
    names = ["torch", "onnxscript", "onnx_ir"] + [n for n in logging.root.manager.loggerDict if n.startswith(("torch", "onnxscript", "onnx_ir"))]
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    old = [lg.level for lg in loggers]
    err = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
    if err.getvalue():  # reached only when the export succeeded
        sys.stderr.write(err.getvalue())


def _module_of_op(model: nn.Module, x: torch.Tensor, op: str) -> str | None:
    """Which module calls ``op``: torch.export the model again and read the graph's module stack."""
    want = _op_base(op)
    try:
        with _quiet():
            ep = torch.export.export(model, (x,), strict=False)
            programs = [ep]
            for prog in programs + [None]:
                if prog is None:
                    prog = ep.run_decompositions()
                for n in prog.graph.nodes:
                    name = getattr(n.target, "name", None)
                    if n.op == "call_function" and callable(name) and _op_base(name()) == want:
                        stack = n.meta.get("nn_module_stack") or {}
                        if stack:
                            path = list(stack.values())[-1][0]
                            return _describe(model, path)
                        return _describe(model, "")
    except Exception:  # best effort: the op alone is still named
        return None
    return None


def _module_in_traceback(model: nn.Module, err: BaseException) -> str | None:
    """The innermost module of ``model`` whose forward is on the failing stack."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for e in _chain(err):
        tb = e.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                found = names[id(owner)]
            tb = tb.tb_next
    return _describe(model, found) if found is not None else None


def _first_line(err: BaseException) -> str:
    """The most specific one-line reason: the innermost error's first non-empty line."""
    for e in reversed(_chain(err)):
        text = _ANSI.sub("", str(e)).strip()
        if text:
            return " ".join(text.splitlines()[0].split())[:300]
    return type(err).__name__


def export_error(model: nn.Module, x: torch.Tensor, err: BaseException, what: str = "ONNX export") -> ModelError:
    """A one-line ModelError naming the failing op and module where they can be found."""
    op = _unsupported_op(err)
    where = _module_of_op(model, x, op) if op else None
    where = where or _module_in_traceback(model, err)
    parts = [f"{what} failed"]
    if op:
        parts.append(f"at op {op}")
    if where:
        parts.append(f"in module {where}")
    hint = ("replace the unsupported op in that module (or move it out of forward), or try another opset in the target profile"
            if op else "make the module traceable by torch.export (no data-dependent Python control flow), then build again")
    return ModelError(" ".join(parts) + f": {_first_line(err)}", hint=hint)


def strip_metadata(m) -> None:
    """Drop the exporter's per-node metadata and doc strings (in place): stack traces with
    absolute paths, module and class names, FX node text. They leak the user's folder layout
    and make the bytes depend on where the project lives; nothing at run time reads them."""

    def graph(g) -> None:
        g.doc_string = ""
        del g.metadata_props[:]
        for v in list(g.input) + list(g.output) + list(g.value_info):
            v.doc_string = ""
            del v.metadata_props[:]
        for init in g.initializer:
            del init.metadata_props[:]
        for n in g.node:
            n.doc_string = ""
            del n.metadata_props[:]
            for a in n.attribute:
                if a.g is not None and a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)

    m.doc_string = ""
    graph(m.graph)
    for f in m.functions:
        f.doc_string = ""
        del f.metadata_props[:]
        for n in f.node:
            n.doc_string = ""
            del n.metadata_props[:]


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, batch) -> dict:
    model = model.cpu().eval()
    h_w_c = tuple(example.shape[1:])
    x = torch.zeros((batch if isinstance(batch, int) else 1,) + h_w_c)
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, external_data=False)
    if batch == "dynamic":
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    t0 = time.perf_counter()
    try:
        with _quiet():
            torch.onnx.export(model, (x,), str(path), dynamo=True, **kwargs)
    except Exception as e:
        raise export_error(model, x, e) from e
    seconds = time.perf_counter() - t0
    import onnx

    m = onnx.load(str(path))
    strip_metadata(m)
    onnx.save(m, str(path))
    try:
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:
        raise ModelError(f"exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}", hint="report this as a bug with the model") from e
    data_files = [p for p in path.parent.iterdir() if p.name.endswith(".data")]
    if data_files:
        raise ModelError("ONNX export wrote external data files; edgebuild expects one self-contained file", hint="models over 2 GB are not supported yet")
    opset_used = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), opset)
    if opset_used != opset:  # the exporter rewrites opsets it cannot target without an error
        raise ModelError(f"the ONNX exporter wrote opset {opset_used}, not the requested opset {opset}",
                         hint=f"set 'opset: {opset_used}' in the target profile")
    return {"seconds": seconds, "opset": int(opset_used), "opset_requested": int(opset), "bytes": path.stat().st_size}


def opset_of(artifact: Path, export_dir: Path) -> int | None:
    """The ONNX opset of what ships: read from the artifact's model.onnx, or (OpenVINO) from the
    export stage's record of the ONNX model it was converted from."""
    import json

    import onnx

    if (artifact / "model.onnx").is_file():
        m = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
        return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    try:
        return int(json.loads((export_dir / "meta.json").read_text())["opset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def example_input(example: torch.Tensor, batch) -> torch.Tensor:
    """Zeros of the profile's static batch (1 for a dynamic one) and the example's image shape."""
    return torch.zeros((batch if isinstance(batch, int) else 1,) + tuple(example.shape[1:]))


def convert(model: nn.Module, example: torch.Tensor, batch, what: str, fn):
    """Run a torch.export-based converter ``fn(model, x)`` quietly; a failure becomes one
    ModelError line naming the failing op and module, as for the ONNX export."""
    model = model.cpu().eval()
    x = example_input(example, batch)
    t0 = time.perf_counter()
    try:
        with _quiet():
            out = fn(model, x)
    except ModelError:
        raise
    except Exception as e:
        raise export_error(model, x, e, what) from e
    return out, time.perf_counter() - t0


def model_files(profile: TargetProfile) -> list[str]:
    """The files that make up an artifact of this profile's format (the runtime adapter knows)."""
    from ..runtimes import adapter

    return adapter(profile.runtime).model_files(profile)


def run(model: nn.Module, example: torch.Tensor, profile: TargetProfile, out: Path) -> dict:
    """Export through the profile's runtime adapter (ONNX, then IR, for the ONNX-based runtimes)."""
    from ..runtimes import adapter

    return adapter(profile.runtime).export(model, example, profile, out)
