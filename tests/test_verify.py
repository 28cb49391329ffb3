"""`edgebuild verify`: checksums of bundle folders and archives; unsafe archives refused unread."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgebuild.errors import BundleError
from edgebuild.stages.bundle import SCHEMA, file_table, make_archive
from edgebuild.verify import verify_bundle


def make_bundle(root: Path, name="demo-t", schema=SCHEMA) -> Path:
    b = root / name
    (b / "cpp").mkdir(parents=True)
    (b / "model.onnx").write_bytes(bytes(range(256)) * 4)
    (b / "labels.txt").write_text('naïve "quote"\nb\n', encoding="utf-8")
    (b / "infer.py").write_text("print('hi')\n")
    (b / "cpp" / "main.cpp").write_text("int main() { return 0; }\n")
    manifest = {"schema": schema, "name": "demo", "files": file_table(b)}
    (b / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return b


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgebuild", "verify", *map(str, args)], capture_output=True, text=True)


def test_clean_bundle_and_archive_verify(tmp_path):
    b = make_bundle(tmp_path)
    assert verify_bundle(b)["files"] == 4
    make_archive(b, tmp_path / "demo-t.tar.gz", "demo-t")
    assert verify_bundle(tmp_path / "demo-t.tar.gz")["files"] == 4
    r = cli(tmp_path / "demo-t.tar.gz")
    assert r.returncode == 0 and "4 files match" in r.stdout


@pytest.mark.parametrize("damage", ["flip", "missing", "extra", "manifest-edit"])
def test_damaged_bundle_folder_fails(tmp_path, damage):
    b = make_bundle(tmp_path)
    if damage == "flip":
        data = bytearray((b / "model.onnx").read_bytes())
        data[100] ^= 0x01
        (b / "model.onnx").write_bytes(bytes(data))
        expect = "altered: model.onnx"
    elif damage == "missing":
        (b / "cpp" / "main.cpp").unlink()
        expect = "missing: cpp/main.cpp"
    elif damage == "extra":
        (b / "evil.sh").write_text("rm -rf /\n")
        expect = "not in manifest: evil.sh"
    else:
        m = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
        m["files"]["labels.txt"] = "0" * 64
        (b / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
        expect = "altered: labels.txt"
    with pytest.raises(BundleError, match=expect.replace(".", r"\.")):
        verify_bundle(b)
    r = cli(b)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["flip", "missing", "extra"])
def test_damaged_archive_fails(tmp_path, damage):
    b = make_bundle(tmp_path)
    if damage == "flip":
        (b / "infer.py").write_text("print('hI')\n")
    elif damage == "missing":
        (b / "labels.txt").unlink()
    else:
        (b / "extra.txt").write_text("x")
    archive = tmp_path / "demo-t.tar.gz"
    make_archive(b, archive, "demo-t")  # a consistent .sha256: only the manifest can tell
    with pytest.raises(BundleError, match="does not match its manifest"):
        verify_bundle(archive)
    assert cli(archive).returncode == 2


def test_archive_flipped_byte_caught_by_sidecar(tmp_path):
    b = make_bundle(tmp_path)
    archive = tmp_path / "demo-t.tar.gz"
    make_archive(b, archive, "demo-t")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x40
    archive.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(archive)
    (tmp_path / "demo-t.tar.gz.sha256").unlink()  # without the sidecar: gzip CRC or a checksum fails
    with pytest.raises(BundleError):
        verify_bundle(archive)


def test_unknown_schema_is_exit_2(tmp_path):
    b = make_bundle(tmp_path, schema="edgebuild.bundle/99")
    r = cli(b)
    assert r.returncode == 2 and "unknown manifest schema" in r.stderr
    make_archive(b, tmp_path / "demo-t.tar.gz", "demo-t")
    assert cli(tmp_path / "demo-t.tar.gz").returncode == 2


def _evil_archive(path: Path, kind: str) -> None:
    """A bundle archive plus one hostile entry of the given kind."""
    b = make_bundle(path.parent / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(b, arcname="demo-t")
        ti = tarfile.TarInfo()
        if kind == "dotdot":
            ti.name, ti.size = "demo-t/../../escaped.txt", 5
            tar.addfile(ti, io.BytesIO(b"owned"))
        elif kind == "absolute":
            ti.name, ti.size = "/tmp/edgebuild-absolute-owned.txt", 5
            tar.addfile(ti, io.BytesIO(b"owned"))
        elif kind == "symlink":
            ti.name, ti.type, ti.linkname = "demo-t/link", tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(ti)
        elif kind == "hardlink":
            ti.name, ti.type, ti.linkname = "demo-t/hard", tarfile.LNKTYPE, "/etc/passwd"
            tar.addfile(ti)
        elif kind == "device":
            ti.name, ti.type, ti.devmajor, ti.devminor = "demo-t/null", tarfile.CHRTYPE, 1, 3
            tar.addfile(ti)
        elif kind == "fifo":
            ti.name, ti.type = "demo-t/fifo", tarfile.FIFOTYPE
            tar.addfile(ti)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("kind,expect", [("dotdot", "escapes"), ("absolute", "absolute"), ("symlink", "link"),
                                         ("hardlink", "link"), ("device", "device"), ("fifo", "fifo")])
def test_unsafe_archives_refused_without_extracting(tmp_path, kind, expect, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    archive = tmp_path / "evil.tar.gz"
    _evil_archive(archive, kind)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(BundleError, match=expect):
        verify_bundle(archive)
    r = cli(archive)
    assert r.returncode == 2 and "refused" in r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere here
    assert not os.path.exists("/tmp/edgebuild-absolute-owned.txt")
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_not_an_archive_is_exit_2(tmp_path):
    bogus = tmp_path / "x.tar.gz"
    bogus.write_bytes(b"not a tar")
    r = cli(bogus)
    assert r.returncode == 2 and "error:" in r.stderr
    assert cli(tmp_path / "nope").returncode == 2
