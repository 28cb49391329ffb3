"""Property-based tests: untrusted or malformed input only ever gives an edgebuild error.

(a) arbitrary YAML text, arbitrary YAML documents and mappings mutated from the shipped example
    given to ``load_build_config`` (and to target profiles) raise nothing but ConfigError, with a
    one-line message and hint, and write nothing;
(b) arbitrary tar archives (hostile names, links, devices, fifos, random bytes, truncated or
    damaged compression) given to ``verify_bundle`` raise nothing but BundleError and write
    nothing anywhere: verify never extracts.

The default run is short (CI). A long fuzzing run:

    EDGEBUILD_FUZZ_EXAMPLES=5000 pytest tests/test_properties.py -q -p no:cacheprovider
"""

from __future__ import annotations

import atexit
import bz2
import contextlib
import copy
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import string
import tarfile
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgebuild.config import load_build_config
from edgebuild.errors import BundleError, ConfigError
from edgebuild.verify import verify_bundle

from conftest import EXAMPLE

EXAMPLES = int(os.environ.get("EDGEBUILD_FUZZ_EXAMPLES", "0") or 0)
FUZZ = EXAMPLES > 0

PROPS = settings(
    max_examples=EXAMPLES or 120,
    deadline=None,
    database=None,  # write nothing into the repository (.hypothesis/)
    derandomize=not FUZZ,  # CI: the same examples every run; fuzzing: fresh ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)


# ------------------------------------------------------------------------------ helpers
def snapshot(*roots: Path) -> dict:
    """Every path under the roots with its type, size and mtime: any write shows up."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st_ = os.lstat(p)
                out[p] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


_BASE = Path(tempfile.mkdtemp(prefix="edgebuild-prop-"))
atexit.register(shutil.rmtree, _BASE, True)


@contextlib.contextmanager
def sandbox():
    """A fresh folder (always the same path, so generated data never depends on a random temp
    name) with a work folder that is the cwd; yields (folder, work)."""
    old = os.getcwd()
    root = _BASE / "case"
    shutil.rmtree(root, ignore_errors=True)
    work = root / "work"
    work.mkdir(parents=True)
    os.chdir(work)
    try:
        yield root, work
    finally:
        os.chdir(old)
        shutil.rmtree(root, ignore_errors=True)


def one_line(err) -> None:
    assert err.message and "\n" not in err.message and "\r" not in err.message, repr(err.message)
    assert err.hint and "\n" not in err.hint, repr(err.hint)


# ------------------------------------------------------------------------------ (a) build files
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["python:backbone.py:build", "hf:x", "timm:", "torchvision:resnet18", "x86-onnxruntime-fp32",
                     "finetune", "grayscale", "letterbox", "dynamic", "../..", "/etc/passwd", "~", "1e999", "-1", "0x10"]),
)
values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), kids, max_size=4)),
    max_leaves=12,
)

EXAMPLE_CFG = yaml.safe_load((EXAMPLE / "edgebuild.yaml").read_text())
EXAMPLE_CFG["compress"] = {"prune": {"ratio": 0.5, "recover_epochs": 2}, "distill": {"temperature": 4.0, "alpha": 0.5},
                           "quantize": {"calibration_samples": 300}}
EXAMPLE_CFG["budgets"] = {"max_latency_ms": 5, "max_size_mb": 1, "max_accuracy_drop": 0.02, "min_agreement": 0.9}


def _paths(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(EXAMPLE_CFG) if p]
KEYS = sorted({str(p[-1]) for p in ALL_PATHS if isinstance(p[-1], str)})


@st.composite
def mutated_configs(draw):
    cfg = copy.deepcopy(EXAMPLE_CFG)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = cfg
        try:
            for part in path[:-1]:
                parent = parent[part]
            last = path[-1]
            parent[last]
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(parent, (dict, list)):  # an earlier mutation turned it into a scalar
            continue
        op = draw(st.sampled_from(["set", "delete", "rename", "add", "retype"]))
        if op == "set":
            parent[last] = draw(values)
        elif op == "retype":
            v = parent[last]
            parent[last] = draw(st.sampled_from([str(v), [v], {"v": v}, None, -1, 10**9, 0.0, "", True]))
        elif op == "delete":
            del parent[last]
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.one_of(st.text(max_size=12), st.sampled_from([k + "s" for k in KEYS] + [k[:-1] for k in KEYS])))
            parent[new] = parent.pop(last)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(values)
    return cfg


def _load(text: str | bytes):
    """load_build_config on this text inside a sandbox: only ConfigError, nothing written."""
    with sandbox() as (root, work):
        p = root / "edgebuild.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        before = snapshot(root)
        try:
            cfg = load_build_config(p)
        except ConfigError as e:
            one_line(e)
            cfg = None
        assert snapshot(root) == before
        return cfg


@PROPS
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_any_text_gives_config_error_or_config(text):
    _load(text)


@PROPS
@given(st.binary(max_size=200))
def test_any_bytes_give_config_error_or_config(data):
    _load(data)


@PROPS
@given(values)
def test_any_yaml_document_gives_config_error_or_config(doc):
    _load(yaml.safe_dump(doc, allow_unicode=True))


@PROPS
@given(mutated_configs())
def test_mutated_example_gives_config_error_or_config(doc):
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    cfg = _load(text)
    if cfg is not None:  # what loads is what was asked for
        assert cfg.name == doc["name"]


yaml_fragments = st.sampled_from([
    "name: x\n", "backbone: {source: python:a.py:f}\n", "  - a\n", "key: [unclosed\n", "? complex\n: key\n", "&a x\n", "*a\n",
    "!!python/object/apply:os.system ['true']\n", "!!binary AAAA\n", "!custom 1\n", "<<: *a\n", "---\n", "...\n", "%YAML 1.1\n",
    "a: &x [*x]\n", "\t\n", "data: {train: '\\x00'}\n", "seed: 1e400\n", "'\\ud800': 1\n", "preprocess: {input_size: [0, 99999]}\n",
])


@PROPS
@given(st.lists(st.one_of(yaml_fragments, st.text(max_size=20)), max_size=8))
def test_spliced_yaml_gives_config_error_or_config(parts):
    base = (EXAMPLE / "edgebuild.yaml").read_text().splitlines(keepends=True)
    _load("".join(base[: len(parts)] + parts + base[len(parts):]))


@PROPS
@given(st.dictionaries(st.sampled_from(["runtime", "device", "arch", "format", "precision", "opset", "batch", "threads", "align",
                                         "quantization", "fallback", "budgets", "extends", "description", "bogus"]),
                       values, max_size=5))
def test_any_target_profile_gives_config_error_or_profile(over):
    from edgebuild.profiles import ProfileRegistry

    with sandbox() as (root, work):
        d = root / "targets"
        d.mkdir()
        base = yaml.safe_load((Path(__file__).resolve().parent.parent / "targets" / "x86-onnxruntime-int8.yaml").read_text())
        base.update(over)
        (d / "fuzz.yaml").write_text(yaml.safe_dump(base, allow_unicode=True))
        before = snapshot(root)
        try:
            ProfileRegistry([d]).get("fuzz")
        except ConfigError as e:
            one_line(e)
        assert snapshot(root) == before


# ------------------------------------------------------------------------------ (b) archives
TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
         tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"Z", b"V"]


def member_names(root: str):
    good = st.builds(lambda a, b: f"demo-t/{a}{b}", st.sampled_from(["", "cpp/", "a/b/"]),
                     st.sampled_from(["model.onnx", "labels.txt", "infer.py", "manifest.json", "x", "."]))
    hostile = st.sampled_from([
        "..", "../x", "demo-t/../../escaped", "demo-t/..", "/abs", "//abs", f"{root}/abs-owned", "C:evil", "C:\\evil",
        "demo-t\\..\\..\\evil", ".", "./demo-t/model.onnx", "demo-t/./labels.txt", "demo-t//infer.py", "other/x", "x",
        "demo-t/" + "a" * 300, "demo-t/\x00nul", "demo-t/new\nline", "demo-t/\udcff", "",
    ])
    return st.one_of(good, hostile, st.text(max_size=40))


@st.composite
def archives(draw, root: str):
    """Bytes of a (maybe) tar archive: random members, maybe a manifest that fits, maybe damage."""
    members = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(TYPES))
        name = draw(member_names(root))
        data = draw(st.binary(max_size=64)) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else b""
        link = draw(st.sampled_from(["/etc/passwd", "../../x", "demo-t/model.onnx", "", f"{root}/target"]))
        members.append((name, kind, data, link))
    manifest = draw(st.sampled_from(["none", "fits", "wrong-schema", "garbage", "not-object", "bad-files"]))
    if manifest != "none":
        files = {n[len("demo-t/"):]: hashlib.sha256(d).hexdigest() for n, k, d, _ in members
                 if isinstance(n, str) and n.startswith("demo-t/") and k in (tarfile.REGTYPE, tarfile.AREGTYPE)}
        body = {"fits": {"schema": "edgebuild.bundle/1", "files": files},
                "wrong-schema": {"schema": draw(values), "files": files},
                "garbage": None, "not-object": draw(values),
                "bad-files": {"schema": "edgebuild.bundle/1", "files": draw(values)}}[manifest]
        raw = draw(st.binary(max_size=40)) if body is None else json.dumps(body).encode()
        members.insert(draw(st.integers(0, len(members))), ("demo-t/manifest.json", tarfile.REGTYPE, raw, ""))
    buf = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, data, link in members:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.size = len(data)
            ti.linkname = link
            ti.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o777, 0]))
            if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                ti.devmajor, ti.devminor = 1, 3
            try:
                tar.addfile(ti, io.BytesIO(data) if data else None)
            except (ValueError, UnicodeError, tarfile.TarError):
                pass  # a name this format cannot hold: skip it
    raw = buf.getvalue()
    comp = draw(st.sampled_from(["none", "gz", "bz2", "xz"]))
    raw = {"none": raw, "gz": gzip.compress(raw, mtime=0), "bz2": bz2.compress(raw), "xz": lzma.compress(raw)}[comp]
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "append", "random"]))
    if damage == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    elif damage == "append":
        raw += draw(st.binary(min_size=1, max_size=64))
    elif damage == "random":
        raw = draw(st.binary(max_size=600))
    return raw


def _no_extract(*a, **k):  # verify must never extract
    raise AssertionError("verify_bundle tried to extract an archive member to disk")


@PROPS
@given(st.data())
def test_any_archive_gives_bundle_error_or_result_and_writes_nothing(data):
    with sandbox() as (root, work):
        raw = data.draw(archives(str(root)))
        archive = root / "bundle.tar.gz"
        archive.write_bytes(raw)
        sidecar = data.draw(st.sampled_from(["none", "none", "right", "wrong", "garbage"]))
        if sidecar != "none":
            text = {"right": hashlib.sha256(raw).hexdigest() + "  bundle.tar.gz\n", "wrong": "0" * 64 + "\n", "garbage": ""}[sidecar]
            (root / "bundle.tar.gz.sha256").write_text(text)
        before = snapshot(root)
        with mock.patch.object(tarfile.TarFile, "extract", _no_extract), \
                mock.patch.object(tarfile.TarFile, "extractall", _no_extract), \
                mock.patch.object(tarfile.TarFile, "makefile", _no_extract):
            try:
                result = verify_bundle(archive)
            except BundleError as e:
                one_line(e)
            else:
                assert result["schema"] == "edgebuild.bundle/1"
        assert snapshot(root) == before


# a bundle folder given to verify: hostile trees (links, fifos, odd names) never write
@PROPS
@given(st.lists(st.tuples(st.sampled_from(["file", "dir", "symlink", "dangling", "fifo"]),
                          st.text(alphabet=string.ascii_letters + string.digits + " .-_'\"\\é", min_size=1, max_size=12),
                          st.binary(max_size=32)), max_size=5),
       st.sampled_from(["fits", "missing", "garbage", "dir", "symlink", "fifo"]))
def test_any_bundle_folder_gives_bundle_error_or_result(entries, manifest):
    with sandbox() as (root, work):
        b = root / "bundle"
        b.mkdir()
        files = {}
        for kind, name, data in entries:
            p = b / name
            if name in (".", "..") or os.path.lexists(p) or name == "manifest.json":
                continue
            if kind == "file":
                p.write_bytes(data)
                files[name] = hashlib.sha256(data).hexdigest()
            elif kind == "dir":
                p.mkdir()
            elif kind == "symlink":
                p.symlink_to(root / "work")
            elif kind == "dangling":
                p.symlink_to(root / "nowhere")
            else:
                os.mkfifo(p)
        mf = b / "manifest.json"
        if manifest == "fits":
            mf.write_text(json.dumps({"schema": "edgebuild.bundle/1", "files": files}))
        elif manifest == "garbage":
            mf.write_bytes(b"\xff{")
        elif manifest == "dir":
            mf.mkdir()
        elif manifest == "symlink":
            mf.symlink_to(root / "work")
        elif manifest == "fifo":
            os.mkfifo(mf)
        before = snapshot(root)
        try:
            verify_bundle(b)
        except BundleError as e:
            one_line(e)
        assert snapshot(root) == before


# ------------------------------------------------------------------------------ (c) the YAML loader itself
YAML_KEYS = ["a", "b", "'a'", '"b"', "1", "'1'", "1.0", "true", "~", "transfer"]
GOOD_VALUES = {"1": 1, "x": "x", "2024-01-01": __import__("datetime").date(2024, 1, 1), "!!float 1.5": 1.5, "!!str 12": "12",
               "[1, 2]": [1, 2], "{c: 1}": {"c": 1}, "!!binary AAAA": b"\0\0\0", "null": None}
BAD_VALUES = ["2024-13-01", "2024-02-30", "!!int x", "!!float fast", "!!bool maybe", "!!timestamp never", "{c: 1, c: 2}",
              "9" * 5000, "!!python/object/apply:os.system ['true']"]


@PROPS
@given(st.lists(st.tuples(st.sampled_from(YAML_KEYS), st.sampled_from(sorted(GOOD_VALUES) + BAD_VALUES)), min_size=1, max_size=6))
def test_yaml_loader_refuses_duplicate_keys_and_bad_values_with_their_line(pairs):
    """Each line 'KEY: VALUE': the loader gives exactly yaml.safe_load's mapping when keys are
    distinct and every value builds; otherwise a ConfigError naming the file and a line."""
    from edgebuild.loaders import parse_yaml

    text = "".join(f"{k}: {v}\n" for k, v in pairs)
    keys = [next(iter(yaml.safe_load(f"{k}: 0"))) for k, _ in pairs]
    duplicate = len(set(keys)) < len(keys)  # as a dict sees them: 1 and 1.0 are one key
    bad = any(v in BAD_VALUES for _, v in pairs)
    try:
        data = parse_yaml(text, Path("x.yaml"), "build file")
    except ConfigError as e:
        one_line(e)
        assert duplicate or bad, (text, e.message)
        assert e.message.startswith("x.yaml:")
        if not e.message.startswith("x.yaml: the YAML"):
            assert "line " in e.message, e.message
        if duplicate and not bad:
            assert "duplicate key" in e.message
    else:
        assert not duplicate and not bad, text
        assert data == {k: GOOD_VALUES[v] for k, (_, v) in zip(keys, pairs)}


@PROPS
@given(st.sampled_from(["!!int", "!!float", "!!bool", "!!timestamp", "!!binary", "!!str", "!!null", "!!map", "!!seq", "!!set",
                        "!!omap", "!!pairs", "!!merge", "!!value", "!foo", "!!python/name:os.system", ""]),
       st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20))
def test_yaml_loader_any_tagged_scalar_is_a_value_or_a_config_error(tag, value):
    from edgebuild.loaders import parse_yaml

    text = f"key: {tag} {json.dumps(value)}\n"
    try:
        parse_yaml(text, Path("x.yaml"), "build file")
    except ConfigError as e:
        one_line(e)


# ------------------------------------------------------------------------------ (d) the manifest reader
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=10)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)), max_leaves=8)


@st.composite
def manifest_texts(draw):
    """manifest.json text: a fitting manifest, damaged in one of the ways a hand or a tool could."""
    files = {"model.onnx": hashlib.sha256(b"m").hexdigest()}
    body = {"schema": "edgebuild.bundle/1", "files": files, "x": draw(json_values)}
    text = json.dumps(body)
    damage = draw(st.sampled_from(["none", "duplicate-files", "duplicate-schema", "huge-int", "nan", "deep", "truncate", "bom", "random"]))
    if damage == "duplicate-files":  # a second 'files' that another reader (first wins) would believe
        text = text[:-1] + ', "files": {}}'
    elif damage == "duplicate-schema":
        text = text[:-1] + ', "schema": "edgebuild.bundle/1"}'
    elif damage == "huge-int":
        text = text[:-1] + ', "n": ' + "7" * draw(st.integers(4400, 6000)) + "}"
    elif damage == "nan":
        text = text[:-1] + ', "n": ' + draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])) + "}"
    elif damage == "deep":
        text = text[:-1] + ', "n": ' + "[" * draw(st.integers(1, 50000)) + "}"
    elif damage == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == "bom":
        text = "\ufeff" + text
    elif damage == "random":
        text = draw(st.text(max_size=60))
    return damage, text


@PROPS
@given(manifest_texts())
def test_manifest_reader_gives_bundle_error_or_result(case):
    """Any manifest.json text in an otherwise fitting bundle folder (and archive): only a
    BundleError or a result; duplicate keys are refused, never resolved silently."""
    damage, text = case
    with sandbox() as (root, work):
        b = root / "demo-t"
        b.mkdir()
        (b / "model.onnx").write_bytes(b"m")
        (b / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        from edgebuild.stages.bundle import make_archive

        make_archive(b, root / "demo-t.tar.gz", "demo-t")
        before = snapshot(root)
        for target in (b, root / "demo-t.tar.gz"):
            try:
                verify_bundle(target)
            except BundleError as e:
                one_line(e)
                if damage.startswith("duplicate"):
                    assert "duplicate key" in e.message
            else:
                assert damage in ("none",), damage
        assert snapshot(root) == before


# ------------------------------------------------------------------------------ (e) list files
list_lines = st.one_of(
    st.builds(lambda p, l: json.dumps({"path": p, "label": l}), st.sampled_from(["imgs/a.png", "imgs/b.png", "nope.png", "../x.png", "", "imgs"]),
              st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none())),
    st.sampled_from(['{"path": "imgs/a.png", "label": "a", "label": "b"}', '{"path": "imgs/a.png", "label": NaN}',
                     '{"path": "imgs/a.png", "label": ' + "9" * 5000 + "}", "[" * 3000, "{}", "[]", "null", '"x"']),
    st.text(max_size=40))


@PROPS
@given(st.sampled_from([".jsonl", ".csv"]), st.lists(list_lines, max_size=6), st.booleans())
def test_any_list_file_gives_data_error_or_a_split(suffix, lines, header):
    """Any .jsonl or .csv list (rows of JSON or text, hostile labels, duplicate keys, NaN,
    huge numbers, deep nesting) gives a DataError naming the file, or a split whose labels are
    single lines; nothing is written."""
    from PIL import Image

    from edgebuild.errors import DataError
    from edgebuild.sources import read_list

    with sandbox() as (root, work):
        (root / "imgs").mkdir()
        for n in ("a", "b"):
            Image.new("L", (4, 4), 10).save(root / "imgs" / f"{n}.png")
        lst = root / f"train{suffix}"
        if suffix == ".csv":
            text = ("path,label\n" if header else "") + "".join(r + "\n" for r in lines)
        else:
            text = "".join(r + "\n" for r in lines)
        lst.write_text(text, encoding="utf-8", errors="surrogatepass")
        before = snapshot(root)
        try:
            split = read_list(lst, "train")
        except DataError as e:
            one_line(e)
            assert str(lst) in e.message
        else:
            assert all(len(("a" + c + "a").splitlines()) == 1 for c in split.classes)
        assert snapshot(root) == before
