"""Bundle: model, labels, preprocessing, stubs, golden self-test, manifest, package.

The bundle folder is assembled in a staging folder; edgebuild/publish.py publishes it into
``dist/`` only when the whole build succeeded. Archives are deterministic: sorted entries, fixed mtime,
uid/gid 0, no gzip name or time.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np

from ..data import sha256_file
from ..render import render
from ..resources import templates_dir

NAME = "bundle"
VERSION = 1
SCHEMA = "edgebuild.bundle/1"
GOLDEN_COUNT = 8
SELFTEST_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2), "int8": (0.15, 0.05)}


def pkg_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def golden_indices(yval: np.ndarray, n: int = GOLDEN_COUNT) -> list[int]:
    """One val image per class first, then more, in a fixed order."""
    out: list[int] = []
    classes = list(dict.fromkeys(int(c) for c in yval))
    for c in classes:
        out.append(int(np.flatnonzero(yval == c)[0]))
    for i in range(len(yval)):
        if len(out) >= n:
            break
        if i not in out:
            out.append(i)
    return sorted(out[:n])


def write_selftest(path: Path, inputs: np.ndarray, outputs: np.ndarray, raw_files: list[Path], precision: str) -> dict:
    atol, rtol = SELFTEST_TOLERANCE[precision]
    arrays = {
        "inputs": inputs.astype(np.float32),
        "outputs": outputs.astype(np.float32),
        "atol": np.float64(atol),
        "rtol": np.float64(rtol),
        "raw_count": np.int64(len(raw_files)),
    }
    for i, f in enumerate(raw_files):
        arrays[f"raw_{i}"] = np.frombuffer(Path(f).read_bytes(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(_normalise_zip(buf.getvalue()))
    return {"count": int(len(inputs)), "atol": atol, "rtol": rtol}


def _normalise_zip(data: bytes) -> bytes:
    """Rewrite a zip with fixed timestamps so selftest.npz is byte-reproducible."""
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            dst.writestr(zi, src.read(info.filename))
    return out.getvalue()


def file_table(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def write_bundle(out: Path, ctx: dict) -> dict:
    """Write every file of one bundle into ``out`` (an empty folder). ``ctx`` holds what the
    templates and manifest need (see manifest.bundle_context)."""
    artifact: Path = ctx["artifact"]
    from ..runtimes import copy_path

    for f in ctx["model_files"]:
        copy_path(artifact / f, out / f)
    (out / "labels.txt").write_text("".join(label + "\n" for label in ctx["labels"]), encoding="utf-8")
    tctx = dict(ctx["template"])
    tctx["preprocess_source"] = (Path(__file__).resolve().parent.parent / "preprocess.py").read_text(encoding="utf-8").strip()
    (out / "infer.py").write_text(render("infer.py.j2", **tctx), encoding="utf-8")
    (out / "requirements.txt").write_text(render("requirements.txt.j2", **tctx), encoding="utf-8")
    selftest = write_selftest(out / "selftest.npz", ctx["golden_inputs"], ctx["golden_outputs"], ctx["golden_raw"], ctx["effective_precision"])
    if tctx.get("has_cpp"):
        cpp = out / "cpp"
        cpp.mkdir()
        # *.j2 are rendered (user strings only through the escaping filters); other files
        # (preprocess.hpp, the vendored public-domain stb_image.h) are copied byte for byte
        for name in sorted(os.listdir(templates_dir() / "cpp")):
            src = templates_dir() / "cpp" / name
            if not src.is_file() or name.startswith("."):
                continue
            if name.endswith(".j2"):
                (cpp / name[:-3]).write_text(render(f"cpp/{name}", **tctx), encoding="utf-8")
            else:
                shutil.copyfile(src, cpp / name)
    (out / "README.md").write_text(render("README.md.j2", **tctx), encoding="utf-8")
    manifest = dict(ctx["manifest"])
    manifest.setdefault("selftest", {"file": "selftest.npz", "command": "python infer.py --selftest", **selftest})
    manifest["stubs"] = {"python": "infer.py", "requirements": "requirements.txt", "cpp": "cpp/" if tctx.get("has_cpp") else None}
    manifest["files"] = file_table(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def make_archive(folder: Path, archive: Path, arcroot: str, previous: Path | None = None) -> str:
    """Deterministic .tar.gz of ``folder`` under ``arcroot/``; returns its sha256. When
    ``previous`` (the archive already in dist/) holds the very same tar, its bytes are reused:
    a cached rebuild does not spend its time in gzip -9."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())
        for p in [folder, *paths]:
            rel = p.relative_to(folder).as_posix()
            name = arcroot if rel == "." else f"{arcroot}/{rel}"
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            if p.is_dir():
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tar.addfile(ti)
            else:
                data = p.read_bytes()
                ti.size = len(data)
                ti.mode = 0o755 if os.access(p, os.X_OK) else 0o644
                tar.addfile(ti, io.BytesIO(data))
    data = _same_archive(previous, buf.getvalue())
    if data is None:
        gz = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=9) as g:
            g.write(buf.getvalue())
        data = gz.getvalue()
    archive.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    archive.with_name(archive.name + ".sha256").write_text(f"{digest}  {archive.name}\n")
    return digest


def _same_archive(previous: Path | None, tar: bytes) -> bytes | None:
    """The bytes of ``previous`` when it is a gzip -9, mtime-0 archive of exactly ``tar``."""
    if previous is None or not previous.is_file():
        return None
    try:
        data = previous.read_bytes()
        # our header: magic, deflate, no flags, mtime 0, XFL 2 (-9); then the content itself
        if data[:9] != b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02" or gzip.decompress(data) != tar:
            return None
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
        return None
    return data
