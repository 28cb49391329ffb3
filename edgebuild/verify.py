"""``verify``: a bundle folder or archive against its manifest; ``validate``: re-run it here.

Archives are read as streams and never extracted: entries with absolute paths, ``..``,
links, devices or other special types are refused before any content is trusted.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from .errors import BundleError
from .files import check_path
from .loaders import loads_json

SCHEMAS = ("edgebuild.bundle/1",)
MAX_MEMBER_BYTES = 4 << 30
MAX_MANIFEST_BYTES = 16 << 20


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def _check_manifest(manifest: dict, where: str) -> None:
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest.json is not a JSON object", hint="the bundle is damaged; rebuild or re-download it")
    schema = manifest.get("schema")
    if schema not in SCHEMAS:
        raise BundleError(f"{where}: unknown manifest schema {schema!r} (this edgebuild reads {', '.join(SCHEMAS)})",
                          hint="use the edgebuild version that built the bundle")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BundleError(f"{where}: manifest.json has no valid 'files' table", hint="the bundle is damaged; rebuild it")


def _compare(expected: dict[str, str], actual: dict[str, str], where: str) -> None:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    altered = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    if missing or extra or altered:
        parts = []
        if altered:
            parts.append("altered: " + _names(altered))
        if missing:
            parts.append("missing: " + _names(missing))
        if extra:
            parts.append("not in manifest: " + _names(extra))
        raise BundleError(f"{where}: does not match its manifest ({'; '.join(parts)})",
                          hint="the bundle was changed after it was built; do not deploy it, get a fresh copy")


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) if not n.isprintable() else n for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _regular_file(p: Path, where: str, what: str) -> None:
    """Refuse links and special files before opening them (a fifo would block forever)."""
    check_path(p, f"{where}: {what}", BundleError, follow=False, hint="bundles contain plain files only")


def _sha(data_iter) -> str:
    h = hashlib.sha256()
    for chunk in data_iter:
        h.update(chunk)
    return h.hexdigest()


def _verify_dir(path: Path) -> dict:
    mf = path / "manifest.json"
    if not os.path.lexists(mf):
        raise BundleError(f"{path}: no manifest.json", hint="point at a bundle folder (dist/NAME-TARGET) or its .tar.gz")
    _regular_file(mf, str(path), "manifest.json")
    try:
        if mf.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mf}: {mf.stat().st_size} bytes, too large for a manifest", hint="the bundle is damaged or not an edgebuild bundle")
        manifest = loads_json(mf.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{mf}: not valid JSON ({_one_line(e)})", hint="the bundle is damaged; rebuild it") from None
    except OSError as e:
        raise BundleError(f"{mf}: cannot read ({e.strerror})", hint="check the file and its permissions") from None
    _check_manifest(manifest, str(path))
    actual = {}
    import stat

    try:
        found = sorted(path.rglob("*"))
    except OSError as e:
        raise BundleError(f"{path}: cannot list the bundle ({e.strerror})", hint="check the folder and its permissions") from None
    for p in found:
        rel = p.relative_to(path).as_posix()
        try:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"{path}: contains a symbolic link: {rel}", hint="bundles contain plain files only")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{path}: contains a fifo, device or other special file: {rel}", hint="bundles contain plain files only")
            if rel != "manifest.json":
                with open(p, "rb") as f:
                    actual[rel] = _sha(iter(lambda: f.read(1 << 20), b""))
        except OSError as e:
            raise BundleError(f"{path}: cannot read {rel} ({e.strerror})", hint="check the file and its permissions") from None
    _compare(manifest["files"], actual, str(path))
    return {"schema": manifest["schema"], "files": len(actual), "manifest": manifest}


def _safe_member(m: tarfile.TarInfo, where: str) -> PurePosixPath:
    name = m.name
    p = PurePosixPath(name)
    if name.startswith("/") or p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{where}: refused: archive entry with an absolute path: {name!r}", hint="the archive is unsafe; do not extract it")
    if ".." in p.parts or ".." in name.split("\\"):
        raise BundleError(f"{where}: refused: archive entry escapes its folder: {name!r}", hint="the archive is unsafe; do not extract it")
    if "\\" in name or "\0" in name:
        raise BundleError(f"{where}: refused: archive entry name with a backslash or NUL: {name!r}", hint="the archive is unsafe; do not extract it")
    if m.issym() or m.islnk():
        raise BundleError(f"{where}: refused: archive entry is a link: {name!r} -> {m.linkname!r}", hint="bundles contain plain files only")
    if not (m.isfile() or m.isdir()):
        raise BundleError(f"{where}: refused: archive entry is a device, fifo or other special file: {name!r}", hint="bundles contain plain files only")
    if m.size > MAX_MEMBER_BYTES:
        raise BundleError(f"{where}: refused: archive entry {name!r} is {m.size} bytes", hint="the archive is not an edgebuild bundle")
    return p


def _open_stream(path: Path) -> tarfile.TarFile:
    """The archive as a stream (never seekable, never extracted). Python's tarfile raises
    TypeError on some truncated gzip headers (e.g. the 3 bytes 1f 8b 08, found by fuzzing)."""
    try:
        return tarfile.open(path, mode="r|*")
    except TypeError:
        raise tarfile.ReadError("truncated compression header") from None


def _verify_archive(path: Path) -> dict:
    where = str(path)
    sidecar = path.with_name(path.name + ".sha256")
    if os.path.lexists(sidecar):
        _regular_file(sidecar, where, sidecar.name)
        try:
            with open(sidecar, "rb") as f:
                want = f.read(4096).decode("utf-8", errors="replace").split()[0:1]
            with open(path, "rb") as f:
                got = _sha(iter(lambda: f.read(1 << 20), b""))
        except OSError as e:
            raise BundleError(f"{where}: cannot read ({e.strerror})", hint="check the file and its permissions") from None
        if not want or want[0].lower() != got:
            raise BundleError(f"{where}: sha256 {got} does not match {sidecar.name}", hint="the archive was altered or truncated; download it again")
    actual: dict[str, str] = {}
    manifest_bytes = None
    root = None
    try:
        with _open_stream(path) as tar:
            for m in tar:
                p = _safe_member(m, where)
                parts = [q for q in p.parts if q not in (".", "")]
                if not parts:
                    continue
                if root is None:
                    root = parts[0]
                if parts[0] != root:
                    raise BundleError(f"{where}: entries under more than one top folder ({root!r}, {parts[0]!r})", hint="a bundle archive holds exactly one folder")
                if m.isdir():
                    continue
                if len(parts) == 1:
                    raise BundleError(f"{where}: file {m.name!r} outside the bundle folder", hint="a bundle archive holds exactly one folder")
                rel = "/".join(parts[1:])
                if rel in actual or (rel == "manifest.json" and manifest_bytes is not None):
                    raise BundleError(f"{where}: duplicate archive entry {m.name!r}", hint="the archive is not a clean edgebuild bundle")
                f = tar.extractfile(m)
                if rel == "manifest.json":
                    if m.size > MAX_MANIFEST_BYTES:
                        raise BundleError(f"{where}: manifest.json is {m.size} bytes, too large for a manifest", hint="this is not an edgebuild bundle")
                    manifest_bytes = f.read() if f else b""
                else:  # streamed: a huge member is hashed, never held in memory
                    actual[rel] = _sha(iter(lambda: f.read(1 << 20), b"")) if f else hashlib.sha256(b"").hexdigest()
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise BundleError(f"{where}: not a readable bundle archive ({_one_line(e)})", hint="the archive is damaged or truncated; download it again") from None
    if manifest_bytes is None:
        raise BundleError(f"{where}: no manifest.json in the archive", hint="this is not an edgebuild bundle")
    try:
        manifest = loads_json(manifest_bytes.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{where}: manifest.json is not valid JSON ({_one_line(e)})", hint="the bundle is damaged; rebuild it") from None
    _check_manifest(manifest, where)
    _compare(manifest["files"], actual, where)
    return {"schema": manifest["schema"], "files": len(actual), "manifest": manifest}


def verify_bundle(path: Path) -> dict:
    path = Path(path)
    if os.path.isdir(path):  # dist/NAME-TARGET may be a link into the published generation
        return _verify_dir(Path(os.path.realpath(path)))
    hint = "give a bundle folder (dist/NAME-TARGET) or NAME-TARGET.tar.gz"
    if not os.path.lexists(path):
        raise BundleError(f"bundle not found: {path}", hint=hint)
    check_path(path, "bundle", BundleError, hint=hint)  # "not a regular file (a fifo)" ...
    return _verify_archive(Path(os.path.realpath(path)))


def _manifest_profile(manifest: dict, where: str):
    """The manifest's target profile, checked against the model it lists: an edited runtime,
    format or file list is refused here instead of failing inside the runtime."""
    from pydantic import ValidationError

    from .config import TargetProfile
    from .stages.export import model_files

    try:
        prof = TargetProfile.model_validate(manifest.get("target"))
    except ValidationError as e:
        raise BundleError(f"{where}: manifest 'target' is not a valid target profile ({_one_line(e)})",
                          hint="the bundle is damaged or from another edgebuild version") from None
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise BundleError(f"{where}: manifest has no 'model' section", hint="the bundle is damaged; rebuild it")
    want = model_files(prof)
    problems = []
    if model.get("format") != prof.format:
        problems.append(f"model.format {model.get('format')!r} but target format {prof.format!r} (runtime {prof.runtime})")
    if model.get("files") != want:
        problems.append(f"model.files {model.get('files')!r} but a {prof.format} model is {want}")
    missing = [f for f in want if f not in manifest["files"] and not any(k.startswith(f + "/") for k in manifest["files"])]  # a folder (.mlpackage) lists its files
    if missing:
        problems.append(f"no {', '.join(missing)} in the bundle")
    if model.get("precision") not in ("fp32", "fp16", "int8"):
        problems.append(f"model.precision {model.get('precision')!r}")
    if problems:
        raise BundleError(f"{where}: manifest disagrees with its model: {'; '.join(problems)}",
                          hint="the manifest was edited after the build; do not deploy it, rebuild the bundle")
    return prof


def validate_bundle(path: Path, emulate: bool = False, cache_root: Path | None = None, progress=None) -> dict:
    """Verify, then run the bundle's own ``infer.py --selftest`` and a latency benchmark here;
    with ``emulate``, an aarch64 bundle runs under qemu-user instead (self-test and agreement with
    its golden outputs; no latency)."""
    import numpy as np

    if os.path.isdir(path):  # one generation of dist/, even if dist/ flips to a newer one meanwhile
        path = Path(os.path.realpath(path))
    info = verify_bundle(path)
    manifest = info["manifest"]
    with tempfile.TemporaryDirectory(prefix="edgebuild-validate-") as tmp:
        folder = Path(path)
        if not folder.is_dir():
            folder = Path(tmp) / "bundle"
            folder.mkdir()
            try:
                with _open_stream(path) as tar:  # verified above: plain files in one folder
                    for m in tar:
                        parts = [q for q in _safe_member(m, str(path)).parts if q not in (".", "")][1:]
                        if not parts or m.isdir():
                            continue
                        dst = folder.joinpath(*parts)
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        f = tar.extractfile(m)
                        with open(dst, "wb") as out_f:
                            for chunk in iter(lambda: f.read(1 << 20), b""):
                                out_f.write(chunk)
            except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
                raise BundleError(f"{path}: not a readable bundle archive ({_one_line(e)})", hint="the archive is damaged or truncated; download it again") from None
            manifest = _verify_dir(folder)["manifest"]  # what runs is exactly what was verified
        _manifest_profile(manifest, str(path))  # the manifest agrees with the files before anything runs
        if emulate:
            return _validate_emulated(folder, manifest, cache_root, progress)
        try:
            proc = subprocess.run([sys.executable, str(folder / "infer.py"), "--selftest"], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise BundleError(f"{path}: the bundle's self-test did not finish in 600 s", hint="run 'python infer.py --selftest' in the bundle to see why") from None
        out = {"selftest": "passed" if proc.returncode == 0 else "FAILED", "selftest_output": (proc.stdout + proc.stderr).strip()}
        from .profiles import unavailable_reason
        from .runtimes import open_runner

        prof = _manifest_profile(manifest, str(path))
        reason = unavailable_reason(prof)
        if reason:
            out["benchmark"] = None
            out["benchmark_reason"] = f"not run: {reason}"
        elif proc.returncode == 0:
            try:
                x = np.load(folder / "selftest.npz", allow_pickle=False)["inputs"][:1]
                out["benchmark"] = open_runner(prof, folder).benchmark(x)
            except Exception as e:  # noqa: BLE001 - the runtime refused what the manifest describes
                raise BundleError(f"{path}: {prof.runtime} cannot run the bundle's model as its manifest describes it ({_one_line(e)})",
                                  hint="the manifest or the model was edited after the build; rebuild the bundle") from None
        metrics = manifest.get("metrics")
        out["build_p50_ms"] = metrics.get("latency_p50_ms") if isinstance(metrics, dict) else None
    return out


def _validate_emulated(folder: Path, manifest: dict, cache_root: Path | None, progress) -> dict:
    import numpy as np

    from . import emulate
    from .cache import default_root
    from .metrics import agreement, max_abs_diff

    target = manifest.get("target") or {}
    if target.get("arch") != "aarch64":
        raise BundleError(f"{folder}: --emulate is for aarch64 bundles; this one is for {target.get('arch')}",
                          hint="run 'edgebuild validate BUNDLE' without --emulate on a host of its arch")
    with np.load(folder / "selftest.npz") as d:
        x, expected = d["inputs"], d["outputs"]
    r = emulate.run_bundle(folder, x, Path(cache_root) if cache_root else default_root(), progress,
                           log=progress.log if progress else (lambda m: None))
    return {"selftest": r["selftest"], "selftest_output": r["selftest_output"], "validated": emulate.VALIDATION,
            "golden_agreement": agreement(r["logits"], expected), "golden_max_abs_diff": max_abs_diff(r["logits"], expected),
            "benchmark": None, "benchmark_reason": "not measured (emulated)", "emulation": r["emulation"]}
