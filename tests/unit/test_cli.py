"""The `otelflow` command line (no root needed)."""

from __future__ import annotations

import subprocess
import sys

from otelflow import __version__
from otelflow.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otelflow", *args], capture_output=True, text=True, timeout=60
    )


def test_version(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"otelflow {__version__}"


def test_netlab_show_prints_the_address_plan() -> None:
    p = run("netlab", "show")
    assert p.returncode == 0, p.stderr
    assert "shop/frontend-0" in p.stdout and "10.244.1.2" in p.stdout and "fd00:244:0:1::2" in p.stdout
    assert "svc" not in p.stdout or "service" in p.stdout


def test_netlab_show_bad_topology_is_one_line_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "t.yaml"
    f.write_text("nodes: [{name: n1}]\npods: [{name: p, node: n9}]\n")
    p = run("netlab", "show", "-t", str(f))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "unknown node 'n9'" in p.stderr


def test_unknown_command_is_a_usage_error() -> None:
    p = run("frobnicate")
    assert p.returncode == 2
