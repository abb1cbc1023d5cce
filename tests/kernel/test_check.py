"""`otelflow check` on a lab node, as a real process in the node's namespace: healthy, accounting
off, without privileges, with capabilities dropped (setpriv), and the TC attach probe's promise to
leave nothing behind (a foreign clsact filter untouched, an exception mid-probe, a probe killed with
SIGKILL), and the tcx probe's (a foreign tcx program untouched, nothing of its own left; which
attach line counts per source.ebpf.attach). The API server and collector lines are judged in
tests/e2e/test_check_components.py."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from otelflow.ebpf import features
from otelflow.netlab import ns as nsu
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import NodeSpec, PodSpec, Topology
from tests.kernel.tcx import TCX_NEXT, foreign_tcx, tcx_chain

EBPF_CAPS = "-bpf,-perfmon,-sys_admin"
ALL_CAPS = "-net_admin,-bpf,-perfmon,-sys_admin"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(Topology(nodes=(NodeSpec("n1"),), pods=(PodSpec("a", "n1"),))) as lb:
        yield lb


def check(
    lab: Lab, *args: str, user: bool = False, drop: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", lab.node_netns("n1")]
    if user:
        cmd += ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if drop:  # root without these capabilities: gone from the bounding set, so exec cannot regain them
        cmd += ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set={drop}"]
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL", "OTELFLOW", "KUBERNETES_"))}
    e.update(env or {})
    return subprocess.run(
        [*cmd, sys.executable, "-m", "otelflow", "check", *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=120,
    )


def by_name(p: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in json.loads(p.stdout)["checks"]}


def lo_state(lab: Lab) -> tuple[str, str, str]:
    """(qdiscs, ingress filters, egress filters) of lo in the node namespace, as tc prints them."""
    ns = lab.node_netns("n1")
    q = nsu.ns_run(ns, ["tc", "qdisc", "show", "dev", "lo"])
    if "clsact" not in q:
        return q, "", ""
    return (
        q,
        nsu.ns_run(ns, ["tc", "filter", "show", "dev", "lo", "ingress"]),
        nsu.ns_run(ns, ["tc", "filter", "show", "dev", "lo", "egress"]),
    )


def test_healthy_node_passes(lab: Lab) -> None:
    before = lo_state(lab)
    p = check(lab, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    c = by_name(p)
    assert json.loads(p.stdout)["result"] == "pass"
    for name in (
        "kernel BTF",
        "bpf() permitted",
        "tc attach",
        "tcx attach",
        "capability CAP_NET_ADMIN",
        "capability CAP_BPF",
    ):
        assert c[name]["status"] == "pass", c[name]
    assert "nothing left" in c["tc attach"]["detail"]
    assert c["tc attach"]["detail"].endswith("(not used: the eBPF source attaches with tcx)")
    assert "nothing left" in c["tcx attach"]["detail"]
    assert c["tcx attach"]["detail"].endswith("; the eBPF source attaches with tcx")
    assert tcx_chain(netns_path(lab), "lo", "ingress") == []
    assert c["flow source"]["status"] == "pass" and c["flow source"]["detail"].startswith("ebpf (auto: ")
    assert c["conntrack accounting"]["status"] == "pass"
    assert c["conntrack dump"]["status"] == "pass" and c["conntrack events"]["status"] == "pass"
    health = {n: x for n, x in c.items() if n.startswith("TCP health")}
    if "TCP health hooks" not in health:  # otelflow.ebpf.health is in the build: one line per feature
        assert sorted(health) == [f"TCP health: {f}" for f in ("resets", "retransmits", "rtt", "state")]
        for x in health.values():  # this kernel has tp_btf for every feature (fentry is refused)
            assert x["status"] == "pass" and x["detail"].startswith("uses tp_btf/"), x
    assert c["kubernetes API"]["status"] == "skip"  # no kubeconfig, not in a pod
    assert c["collector"]["status"] == "pass" and "no endpoint configured" in c["collector"]["detail"]
    assert all(x["status"] in ("pass", "skip") for x in c.values()), c
    assert lo_state(lab) == before  # the probe left no qdisc or filter on lo
    text = check(lab)
    assert text.returncode == 0 and "WARN" not in text.stdout and "FAIL" not in text.stdout, text.stdout


def test_accounting_off_warns_with_the_remedy(lab: Lab) -> None:
    nsu.sysctl(lab.node_netns("n1"), {"net.netfilter.nf_conntrack_acct": 0})
    try:
        p = check(lab, "--json")
        assert p.returncode == 1, p.stdout + p.stderr
        c = by_name(p)["conntrack accounting"]
        assert c["status"] == "warn" and "nf_conntrack_acct=1" in c["remedy"]
        assert json.loads(p.stdout)["result"] == "warn"
        assert [n for n, x in by_name(p).items() if x["status"] != "pass" and x["status"] != "skip"] == [
            "conntrack accounting"
        ]
    finally:
        nsu.sysctl(lab.node_netns("n1"), {"net.netfilter.nf_conntrack_acct": 1})


def test_without_privileges_the_dump_fails_with_a_remedy(lab: Lab) -> None:
    p = check(lab, "--json", user=True)
    assert p.returncode == 2
    c = by_name(p)
    assert c["conntrack dump"]["status"] == "fail" and "CAP_NET_ADMIN" in c["conntrack dump"]["remedy"]
    assert c["conntrack events"]["status"] == "fail"
    assert c["capability CAP_NET_ADMIN"]["status"] == "fail"


def test_no_capabilities_fails_each_line_with_its_remedy(lab: Lab) -> None:
    p = check(lab, "--json", drop=ALL_CAPS)
    assert p.returncode == 2, p.stdout + p.stderr
    c = by_name(p)
    for name in ("capability CAP_NET_ADMIN", "conntrack dump", "conntrack events"):
        assert c[name]["status"] == "fail" and "CAP_NET_ADMIN" in c[name]["remedy"], c[name]
    # eBPF problems only warn with source.mode=auto: the agent falls back to conntrack
    for name in ("bpf() permitted", "tc attach", "tcx attach"):
        assert c[name]["status"] == "warn" and "Operation not permitted" in c[name]["detail"], c[name]
        assert "CAP_BPF" in c[name]["remedy"]
    assert c["capability CAP_BPF"]["status"] == "warn" and "CAP_BPF" in c["capability CAP_BPF"]["remedy"]
    assert c["capability CAP_PERFMON"]["status"] == "warn"
    assert c["kernel BTF"]["status"] == "pass"  # readable without privileges
    assert c["flow source"]["detail"].startswith("conntrack (auto: eBPF unavailable (bpf() permitted: ")
    assert json.loads(p.stdout)["result"] == "fail"


def test_without_ebpf_capabilities_auto_falls_back_to_conntrack(lab: Lab) -> None:
    p = check(lab, "--json", drop=EBPF_CAPS)
    assert p.returncode == 1, p.stdout + p.stderr
    c = by_name(p)
    assert c["flow source"]["status"] == "pass"
    assert c["flow source"]["detail"].startswith("conntrack (auto: eBPF unavailable (")
    assert c["capability CAP_NET_ADMIN"]["status"] == "pass" and c["conntrack dump"]["status"] == "pass"
    warned = sorted(n for n, x in c.items() if x["status"] == "warn" and not n.startswith("TCP health"))
    assert warned == [
        "bpf() permitted",
        "capability CAP_BPF",
        "capability CAP_PERFMON",
        "tc attach",
        "tcx attach",
    ], c
    health = {n: x for n, x in c.items() if n.startswith("TCP health")}
    if "TCP health hooks" not in health:  # otelflow.ebpf.health is in the build: one line per feature
        assert sorted(health) == [f"TCP health: {f}" for f in ("resets", "retransmits", "rtt", "state")]
        for x in health.values():
            assert (
                x["status"] == "warn" and "no hook works" in x["detail"] and "CAP_PERFMON" in x["remedy"]
            ), x


def test_without_ebpf_capabilities_mode_ebpf_fails(lab: Lab) -> None:
    p = check(lab, "--json", drop=EBPF_CAPS, env={"OTELFLOW_SOURCE__MODE": "ebpf"})
    assert p.returncode == 2, p.stdout + p.stderr
    c = by_name(p)
    assert c["flow source"]["status"] == "fail" and "source.mode: auto" in c["flow source"]["remedy"]
    assert "the eBPF source cannot run here" in c["flow source"]["detail"]
    assert c["bpf() permitted"]["status"] == "fail" and c["capability CAP_BPF"]["status"] == "fail"
    assert c["capability CAP_PERFMON"]["status"] == "warn"  # TCP health only


def test_without_ebpf_capabilities_mode_conntrack_passes(lab: Lab) -> None:
    p = check(lab, "--json", drop=EBPF_CAPS, env={"OTELFLOW_SOURCE__MODE": "conntrack"})
    assert p.returncode == 0, p.stdout + p.stderr
    c = by_name(p)
    assert c["flow source"]["detail"] == "conntrack (requested (source.mode=conntrack))"
    for name in ("bpf() permitted", "tc attach", "tcx attach", "capability CAP_BPF"):
        assert c[name]["status"] == "skip" and c[name]["detail"].startswith(
            "not used with source.mode=conntrack"
        )


def test_forced_tc_backend_is_the_line_that_counts(lab: Lab) -> None:
    p = check(lab, "--json", env={"OTELFLOW_SOURCE__EBPF__ATTACH": "tc"})
    assert p.returncode == 0, p.stdout + p.stderr
    c = by_name(p)
    assert c["tc attach"]["status"] == "pass"
    assert c["tc attach"]["detail"].endswith("; the eBPF source attaches with tc")
    assert c["tcx attach"]["status"] == "pass"
    assert c["tcx attach"]["detail"].endswith("(not used: source.ebpf.attach=tc)")


def test_config_error_is_exit_2(lab: Lab) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "otelflow", "check", "-c", "/nonexistent.yaml"], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1


# ---- the TC attach probe disturbs nobody ---------------------------------------------------------


def netns_path(lab: Lab) -> str:
    return f"/run/netns/{lab.node_netns('n1')}"


def test_tc_probe_leaves_a_foreign_clsact_and_filter_alone(lab: Lab) -> None:
    ns = lab.node_netns("n1")
    nsu.ns_run(ns, ["tc", "qdisc", "add", "dev", "lo", "clsact"])
    try:
        for hook in ("ingress", "egress"):  # classic BPF that matches nothing (no matchall here)
            nsu.ns_run(
                ns,
                [
                    "tc",
                    "filter",
                    "add",
                    "dev",
                    "lo",
                    hook,
                    "prio",
                    "10",
                    "handle",
                    "1",
                    "bpf",
                    "bytecode",
                    "1,6 0 0 0,",
                ],
            )
        before = lo_state(lab)
        assert "pref 10 bpf" in before[1] and "pref 10 bpf" in before[2]
        p = features.probe_tc_attach(netns_path(lab))
        assert p.ok, p
        assert lo_state(lab) == before
    finally:
        nsu.ns_run(ns, ["tc", "qdisc", "del", "dev", "lo", "clsact"])


def test_tc_probe_detaches_on_an_exception(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    before = lo_state(lab)
    seen: list[tuple[str, str, str]] = []

    def boom(ifindex: int, prog_id: int) -> None:
        seen.append(lo_state(lab))  # attached right now
        raise RuntimeError("injected")

    monkeypatch.setattr(features, "_verify_attached", boom)
    with pytest.raises(RuntimeError, match="injected"):
        features.probe_tc_attach(netns_path(lab))
    assert "otelflow_probe" in seen[0][1] and "pref 65535" in seen[0][1]
    assert lo_state(lab) == before


def test_tc_probe_removes_the_filter_of_a_probe_killed_midway(lab: Lab) -> None:
    """A probe SIGKILLed between attach and detach leaves its no-op filter (and clsact); the next
    probe removes both."""
    code = (
        "import os, signal, socket, ctypes as C\n"
        "from otelflow.ebpf import features as f, libbpf as lb\n"
        "fd = f._load_noop_prog()\n"
        "cm = f._probe_filter(socket.if_nametoindex('lo'), fd)\n"
        "cm.__enter__()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    p = subprocess.run(nsu.ns_cmd(lab.node_netns("n1"), [sys.executable, "-c", code]), capture_output=True)
    assert p.returncode == -9, p.stderr
    q, ingress, _ = lo_state(lab)
    assert "clsact" in q and "otelflow_probe" in ingress
    r = features.probe_tc_attach(netns_path(lab))
    assert r.ok, r
    # the stale filter is gone; its clsact stays (this probe did not create it): remove it by hand
    q, ingress, egress = lo_state(lab)
    assert ingress == "" and egress == ""
    nsu.ns_run(lab.node_netns("n1"), ["tc", "qdisc", "del", "dev", "lo", "clsact"])


def test_concurrent_tc_probes_take_turns(lab: Lab) -> None:
    """Probes running at once in one namespace (the agent starting while someone runs check) all
    succeed and leave lo as it was: they serialise on a per-namespace lock."""
    before = lo_state(lab)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: features.probe_tc_attach(netns_path(lab)), range(8)))
    assert [r.ok for r in results] == [True] * 8, results
    assert lo_state(lab) == before


def test_btf_probe_on_the_kernel_and_on_broken_copies(tmp_path: Path) -> None:
    real = features.probe_btf()
    assert real.ok and "CO-RE works" in real.detail, real
    blob = Path(features.BTF_PATH).read_bytes()
    cut = tmp_path / "truncated"
    cut.write_bytes(blob[: len(blob) // 2])
    hdr_len = int.from_bytes(blob[4:8], "little")
    garbled = tmp_path / "garbled"  # a sane header over types that are all 0xff: libbpf refuses it
    garbled.write_bytes(blob[:hdr_len] + b"\xff" * 4096 + blob[hdr_len + 4096 :])
    notbtf = tmp_path / "text"
    notbtf.write_text("this is not BTF at all, just some text\n")
    for path, want in (
        (str(cut), "past the end of the data"),
        (str(notbtf), "bad magic"),
        (str(garbled), "libbpf cannot parse it"),
        (str(tmp_path / "missing"), "No such file or directory"),
    ):
        p = features.probe_btf(path)
        assert not p.ok and want in p.detail and "CONFIG_DEBUG_INFO_BTF" in p.remedy, (path, p)


# ---- the tcx attach probe disturbs nobody ------------------------------------------------------------


def test_tcx_probe_leaves_a_foreign_tcx_program_alone_and_nothing_of_its_own(lab: Lab) -> None:
    before = lo_state(lab)
    with foreign_tcx(netns_path(lab), "lo", "ingress", TCX_NEXT) as theirs:
        p = features.probe_tcx_attach(netns_path(lab))
        assert p.ok and "nothing left" in p.detail, p
        assert tcx_chain(netns_path(lab), "lo", "ingress") == [theirs.prog_id]
        assert tcx_chain(netns_path(lab), "lo", "egress") == []
    assert tcx_chain(netns_path(lab), "lo", "ingress") == []
    assert lo_state(lab) == before  # no qdisc, no filter


def test_concurrent_tcx_probes_all_pass_and_leave_nothing(lab: Lab) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: features.probe_tcx_attach(netns_path(lab)), range(8)))
    assert [r.ok for r in results] == [True] * 8, results
    assert tcx_chain(netns_path(lab), "lo", "ingress") == []
