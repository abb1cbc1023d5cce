"""`otelflow check` on a lab node: healthy, accounting off, and without privileges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from otelflow.netlab import ns as nsu
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import NodeSpec, PodSpec, Topology


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(Topology(nodes=(NodeSpec("n1"),), pods=(PodSpec("a", "n1"),))) as lb:
        yield lb


def check(lab: Lab, *args: str, user: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", lab.node_netns("n1")]
    if user:
        cmd += ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL", "OTELFLOW"))}
    return subprocess.run(
        [*cmd, sys.executable, "-m", "otelflow", "check", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def by_name(p: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in json.loads(p.stdout)["checks"]}


def test_healthy_node_passes(lab: Lab) -> None:
    p = check(lab)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS  conntrack accounting" in p.stdout and "WARN" not in p.stdout and "FAIL" not in p.stdout


def test_accounting_off_warns_with_the_remedy(lab: Lab) -> None:
    nsu.sysctl(lab.node_netns("n1"), {"net.netfilter.nf_conntrack_acct": 0})
    try:
        p = check(lab, "--json")
        assert p.returncode == 1
        c = by_name(p)["conntrack accounting"]
        assert c["status"] == "warn" and "nf_conntrack_acct=1" in c["remedy"]
        assert json.loads(p.stdout)["result"] == "warn"
    finally:
        nsu.sysctl(lab.node_netns("n1"), {"net.netfilter.nf_conntrack_acct": 1})


def test_without_privileges_the_dump_fails_with_a_remedy(lab: Lab) -> None:
    p = check(lab, "--json", user=True)
    assert p.returncode == 2
    c = by_name(p)
    assert c["conntrack dump"]["status"] == "fail" and "CAP_NET_ADMIN" in c["conntrack dump"]["remedy"]
    assert c["conntrack events"]["status"] == "fail"


def test_config_error_is_exit_2(lab: Lab, tmp_path: object) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "otelflow", "check", "-c", "/nonexistent.yaml"], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1
