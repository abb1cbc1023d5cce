"""The committed BPF object is what its source builds to, byte for byte, from anywhere.

Needs the pinned toolchain (Debian 12: clang 14.0.6, llvm-strip, libbpf-dev 1.1.2, which
./scripts/setup installs); skipped elsewhere, where a different compiler legitimately emits other
bytes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BPF = ROOT / "bpf"
OBJECT = ROOT / "otelflow" / "ebpf" / "flow.bpf.o"


def _toolchain() -> str | None:
    if not (shutil.which("clang") and shutil.which("llvm-strip") and shutil.which("make")):
        return None
    if not Path("/usr/include/bpf/bpf_helpers.h").exists():
        return None
    return subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout


pytestmark = pytest.mark.skipif(
    "clang version 14.0.6" not in (_toolchain() or ""),
    reason="the committed flow.bpf.o is built with Debian 12's clang 14.0.6 + libbpf-dev 1.1.2",
)


def _check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", *args, "check"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_committed_object_is_reproducible_from_two_working_directories(tmp_path: Path) -> None:
    a = _check("-C", str(BPF), cwd=ROOT)
    assert a.returncode == 0, a.stdout + a.stderr
    b = _check("-f", str(BPF / "Makefile"), cwd=tmp_path)
    assert b.returncode == 0, b.stdout + b.stderr
    assert "is reproducible" in a.stdout and "is reproducible" in b.stdout


def test_a_copy_elsewhere_builds_the_same_bytes(tmp_path: Path) -> None:
    # no absolute path of the build machine ends up in the object
    src = tmp_path / "deep" / "checkout" / "bpf"
    src.mkdir(parents=True)
    for name in ("Makefile", "flow.bpf.c", "health.bpf.c", "vmlinux.h"):
        shutil.copy(BPF / name, src / name)
    r = subprocess.run(["make", "-s", "-C", str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for obj in (OBJECT, OBJECT.with_name("health.bpf.o")):
        built = tmp_path / "deep" / "checkout" / "otelflow" / "ebpf" / obj.name
        assert built.read_bytes() == obj.read_bytes()
        assert str(tmp_path).encode() not in built.read_bytes()


def test_check_fails_clearly_when_the_source_changed(tmp_path: Path) -> None:
    src = tmp_path / "bpf"
    src.mkdir()
    for name in ("Makefile", "vmlinux.h"):
        shutil.copy(BPF / name, src / name)
    text = (BPF / "flow.bpf.c").read_text()
    assert "#define FL_V6_MAX_EXT 8" in text
    (src / "flow.bpf.c").write_text(text.replace("#define FL_V6_MAX_EXT 8", "#define FL_V6_MAX_EXT 7"))
    (tmp_path / "otelflow" / "ebpf").mkdir(parents=True)
    shutil.copy(OBJECT, tmp_path / "otelflow" / "ebpf" / "flow.bpf.o")
    r = _check("-C", str(src), cwd=tmp_path)
    assert r.returncode != 0
    assert "differs from a fresh build" in r.stderr and "make -C bpf" in r.stderr
