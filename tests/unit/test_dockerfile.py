"""The Dockerfile, read by the official Dockerfile parser (buildkit's, through the `dockerfile`
package): no image can be built on these machines, so this checks what can be checked without one.

* its build steps are the commands CI runs: the BPF build is scripts/test's `make` line verbatim,
  the package install is scripts/setup's `pip install` line minus the editable flag and the test
  extra, the venv is made the same way;
* the final stage installs no compiler, copies only the venv out of the build stage, carries the
  OCI labels, and its version label is the package's;
* .dockerignore lets in exactly what the Dockerfile copies.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPILERS = {"clang", "llvm", "gcc", "g++", "cpp", "make", "build-essential", "libbpf-dev", "libc6-dev"}
OCI_LABELS = {"title", "description", "version", "licenses"}


def stages() -> list[list[Any]]:
    """The Dockerfile's instructions, split into stages (each starts with its FROM)."""
    out: list[list[Any]] = []
    for cmd in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if cmd.cmd == "FROM":
            out.append([])
        assert out, f"instruction before the first FROM: {cmd.original}"
        out[-1].append(cmd)
    return out


def runs(stage: list[Any]) -> list[str]:
    """Each RUN's shell commands (split at &&), whitespace-normalized."""
    out = []
    for c in stage:
        if c.cmd == "RUN":
            out += [" ".join(part.split()) for part in " ".join(c.value).split("&&")]
    return out


def apt_packages(stage: list[Any]) -> set[str]:
    pkgs: set[str] = set()
    for line in runs(stage):
        words = shlex.split(line)
        if words[:2] == ["apt-get", "install"]:
            pkgs |= {w for w in words[2:] if not w.startswith("-")}
    return pkgs


def script_lines(path: str, pattern: str) -> list[str]:
    """The non-comment lines of a script that match ``pattern``, whitespace-normalized."""
    lines = []
    for raw in (ROOT / path).read_text().splitlines():
        line = " ".join(raw.split("#", 1)[0].split())
        if re.search(pattern, line):
            lines.append(line)
    return lines


def test_two_stages_on_debian_12() -> None:
    build, final = stages()
    assert build[0].value == ("debian:12-slim", "AS", "build")
    assert final[0].value == ("debian:12-slim",)


def test_bpf_build_is_the_command_ci_runs() -> None:
    [ci] = script_lines("scripts/test", r"\bmake\b.*-C bpf")
    build, _ = stages()
    docker = [r for r in runs(build) if "-C bpf" in r]
    assert docker == [ci] == ["make -s -C bpf check"]
    # and the build stage has what the bpf Makefile calls (clang, llvm-strip) and includes
    assert {"clang", "llvm", "libbpf-dev", "make"} <= apt_packages(build)


def test_package_install_is_the_command_ci_runs() -> None:
    # setup installs the package with the test extra (CI, `./scripts/test`) or without it
    # (`--runtime`, the demo): the same pip line but for the extra
    lines = script_lines("scripts/setup", r"pip install .*-e")
    [ci] = [x for x in lines if "[test]" in x]
    [runtime] = [x for x in lines if "[test]" not in x]
    build, _ = stages()
    [docker] = [r for r in runs(build) if " install " in r and "pip" in r]
    ci_words, docker_words = shlex.split(ci), shlex.split(docker)
    # the same pip of a venv, the same options, on the same checkout: the image takes the package
    # itself (not editable, no test extra)
    assert ci_words[0] == ".venv/bin/pip" and docker_words[0] == "/opt/otelflow/bin/pip"
    ci_args = [w for w in ci_words[1:] if w != "-e"]
    assert ci_args[-1] == ".[test]"
    assert docker_words[1:] == [*ci_args[:-1], "."]
    assert [w for w in shlex.split(runtime) if w != "-e"] == [ci_words[0], *ci_args[:-1], "."]
    # the venv: CI's `"$PY" -m venv .venv`, the image's `python3 -m venv /opt/otelflow`
    [ci_venv] = script_lines("scripts/setup", r"-m venv")
    assert '"$PY" -m venv .venv' in ci_venv
    assert "python3 -m venv /opt/otelflow" in runs(build)
    # the BPF objects are checked before the package (and them) are installed
    order = runs(build)
    assert order.index("make -s -C bpf check") < order.index(docker)


def test_final_stage_has_no_compiler() -> None:
    _, final = stages()
    assert apt_packages(final) == {"python3", "libbpf1", "ca-certificates"}
    assert not apt_packages(final) & COMPILERS
    copies = [c for c in final if c.cmd == "COPY"]
    assert [(c.flags, c.value) for c in copies] == [(("--from=build",), ("/opt/otelflow", "/opt/otelflow"))]
    assert not [c for c in final if c.cmd == "ADD"]


def test_runtime_library_is_the_one_the_agent_loads() -> None:
    # libbpf1 ships libbpf.so.1, the name otelflow/ebpf/libbpf.py dlopens
    assert 'C.CDLL("libbpf.so.1"' in (ROOT / "otelflow/ebpf/libbpf.py").read_text()
    _, final = stages()
    assert "libbpf1" in apt_packages(final)


def test_oci_labels_and_version() -> None:
    _, final = stages()
    labels: dict[str, str] = {}
    for c in final:
        if c.cmd == "LABEL":
            it = iter(c.value)
            labels.update({k: v.strip('"') for k, v in zip(it, it, strict=True)})
    names = {k.removeprefix("org.opencontainers.image.") for k in labels}
    assert names >= OCI_LABELS
    [arg] = [c.value[0] for c in final if c.cmd == "ARG" and c.value[0].startswith("VERSION=")]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert arg == f"VERSION={version}"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert (
        labels["org.opencontainers.image.licenses"]
        == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    )


def test_entrypoint_runs_the_agent() -> None:
    _, final = stages()
    [ep] = [c for c in final if c.cmd == "ENTRYPOINT"]
    [cmd] = [c for c in final if c.cmd == "CMD"]
    assert ep.json and ep.value == ("otelflow",)
    assert cmd.json and cmd.value == ("run",)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for our simple patterns: the last matching pattern wins; a directory pattern
    ("bpf/") covers everything below it; "*" matches one path element, "**/" any depth."""
    verdict = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        rx = re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(rf"{rx}(?:/.*)?", path):
            verdict = not neg
    return verdict


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("pyproject.toml", False),
        ("README.md", False),
        ("bpf/flow.bpf.c", False),
        ("bpf/Makefile", False),
        ("otelflow/ebpf/flow.bpf.o", False),
        ("otelflow/__pycache__/cli.cpython-311.pyc", True),
        (".venv/bin/python", True),
        (".git/HEAD", True),
        ("tests/unit/test_cli.py", True),
        ("manifests/base/daemonset.yaml", True),
    ],
)
def test_dockerignore(path: str, ignored: bool) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _ignored(path, patterns) is ignored


def test_every_copied_path_is_in_the_context() -> None:
    build, _ = stages()
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [s for c in build if c.cmd == "COPY" and not c.flags for s in c.value[:-1]]
    assert sources == ["pyproject.toml", "README.md", "bpf/", "otelflow/"]
    for s in sources:
        assert (ROOT / s).exists(), s
        assert not _ignored(s.rstrip("/"), patterns), s
