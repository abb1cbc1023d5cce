"""The eBPF source (`otelflow run --source ebpf`), run as real agent processes in netlab nodes.

The same scenarios as the conntrack source, against the lab's independent truth counters: every
flow's bytes and packets per direction exact on every node that sees it, one flow (one id) per
conversation even through Service NAT (conntrack joins the one-way TC counts), the NAT view right.
Also: an interface created while the agent runs is attached and counted; nothing stays attached
(no tc filter, no clsact, no tcx link: BPF_PROG_QUERY on every lab interface) after the agent exits,
also by SIGKILL; a 64-entry flow map under 1,000 flows reports what it could not count; auto mode
picks eBPF here and says why. The attach backend is auto, i.e. tcx on this kernel (the main tcx
coverage); one agent runs with ``source.ebpf.attach: tc`` end to end.
"""

from __future__ import annotations

import ipaddress
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from otelflow.netlab import ns as nsu
from otelflow.netlab.agents import AgentRun, agents, endpoint_nodes, totals, truth
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import NodeSpec, PodSpec, ServiceSpec, Topology, demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator
from tests.kernel.tcx import tcx_chain, tcx_left

pytestmark = pytest.mark.kernel

NODES = ["node-a", "node-b"]
# name -> (client, server, proto, nodes that see it; None: client's and backend's nodes)
SCENARIOS: dict[str, tuple[str, str, str, list[str] | None]] = {
    "same-node": ("frontend-0", "cart-0", "tcp", ["node-a"]),
    "cross-node": ("frontend-0", "db-0", "tcp", ["node-a", "node-b"]),
    "clusterip": ("frontend-1", "svc/payments", "tcp", None),
    "clusterip-cross": ("frontend-0", "svc/payments", "tcp", None),
    "external": ("cart-0", "internet", "tcp", ["node-a"]),
    "from-external": ("internet", "db-0", "tcp", ["node-b"]),
    "host-network": ("node-exporter-a", "db-0", "tcp", ["node-a", "node-b"]),
    "udp-clusterip": ("frontend-1", "svc/dns", "udp", None),
    "udp-cross-node": ("frontend-0", "db-0", "udp", ["node-a", "node-b"]),
}


Run = tuple[Lab, dict[tuple[str, int], FlowResult], dict[str, AgentRun], dict[str, str]]


def metrics_of(lab: Lab, node: str) -> str:
    """The agent's /metrics, read inside the node's namespace (it listens on 127.0.0.1 there)."""
    url = "http://127.0.0.1:9465/metrics"
    code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).read().decode())"
    return nsu.ns_run(lab.node_netns(node), [sys.executable, "-c", code])


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"{name} {labels} not in /metrics")


def our_filters(lab: Lab, node: str) -> list[str]:
    """tc filters of any otelflow program left on the node's interfaces, clsact qdiscs, and every
    tcx program on them (the lab attaches none of its own)."""
    netns = lab.node_netns(node)
    left = tcx_left(f"{nsu.NETNS_RUN_DIR}/{netns}", lab.interfaces()[netns])
    for dev in lab.interfaces()[netns]:
        for d in ("ingress", "egress"):
            out = nsu.ns_run(netns, ["tc", "filter", "show", "dev", dev, d])
            left += [f"{dev} {d}: {x}" for x in out.splitlines() if "otelflow" in x]
        q = nsu.ns_run(netns, ["tc", "qdisc", "show", "dev", dev])
        left += [f"{dev}: {x}" for x in q.splitlines() if "clsact" in x]
    return left


@pytest.fixture(scope="module")
def scenario_run() -> Iterator[
    tuple[Lab, dict[tuple[str, int], FlowResult], dict[str, AgentRun], dict[str, str]]
]:
    with Lab(demo_topology()) as lab:
        specs = []
        for client, server, proto, _ in SCENARIOS.values():
            for fam in (4, 6):
                specs.append(
                    FlowSpec(client, server, proto=proto, family=fam, up=200_000 + fam, down=700_000 + fam)
                )  # type: ignore[arg-type]
        with agents(lab, NODES, source="ebpf") as runs:
            results = TrafficGenerator(lab).run(specs)
            time.sleep(1.5)  # past the next polls (and the one-poll grace for unnamed counts)
            scraped = {node: metrics_of(lab, node) for node in NODES}
        by_name = {}
        for i, name in enumerate(SCENARIOS):
            for j, fam in enumerate((4, 6)):
                by_name[(name, fam)] = results[2 * i + j]
        left = {node: "\n".join(our_filters(lab, node)) for node in NODES}
        yield lab, by_name, runs, {**{f"metrics:{k}": v for k, v in scraped.items()}, **left}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_flow_is_exact_and_one_flow_per_node(scenario_run: Any, name: str, family: int) -> None:
    lab, by_name, runs, _ = scenario_run
    r: FlowResult = by_name[(name, family)]
    assert r.ok, r.error
    client, server, proto, nodes = SCENARIOS[name]
    seen_on = nodes if nodes is not None else endpoint_nodes(lab, r)
    for node in NODES:
        recs = runs[node].flows_of(r)
        if node not in seen_on:
            assert recs == [], f"{node} should not see {name}"
            continue
        assert recs, f"{node} reported nothing for {name}"
        assert all(x["source"] == "ebpf" for x in recs)
        assert totals(recs) == truth(r), f"{name} on {node}"
        # one conversation = one flow, also through Service NAT (never client->VIP + backend->client)
        assert len({x["flow_id"] for x in recs}) == 1, f"{name} on {node}: {recs}"
        assert sum(x["opened"] for x in recs) == 1
        if proto == "tcp":
            assert sum(x["closed"] for x in recs) == 1
        last = recs[-1]
        assert ipaddress.ip_address(last["client_ip"]) == ipaddress.ip_address(r.client_ip)
        assert last["family"] == family and last["observer"] == node
        backend_ip = lab.endpoint(r.server_endpoint).ip(family)
        assert ipaddress.ip_address(last["server_ip"]) == backend_ip
        if server.startswith("svc/") and node == lab.endpoint(client).node:
            assert ipaddress.ip_address(last["dialed_ip"]) == ipaddress.ip_address(r.dialed_ip)
            assert last["dnat"] is True
            assert last["server_port"] == lab.topology.service(server[4:]).target_port
        if name == "external":
            assert last["snat"] is True
            assert ipaddress.ip_address(last["client_nat_ip"]) == lab.topology.node_ip("node-a", family)


def test_agents_say_why_ebpf_and_leave_nothing_attached(scenario_run: Any) -> None:
    lab, _, runs, extra = scenario_run
    for node, run in runs.items():
        assert run.proc.returncode == 0, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        assert "flow source: ebpf (requested;" in run.stderr
        # every pod veth and the uplink, the pod bridge covered
        pods = len(lab.topology.pods_on(node)) - sum(p.host_network for p in lab.topology.pods_on(node))
        text = extra[f"metrics:{node}"]
        assert metric(text, "otelflow_agent_ebpf_interfaces") == pods + 1
        assert (
            metric(text, "otelflow_agent_source", source="ebpf", requested="ebpf", reason="ebpf_ready") == 1
        )
        assert metric(text, "otelflow_agent_ebpf_dropped_packets_total", reason="map_full") == 0
        assert metric(text, "otelflow_agent_ebpf_attach", mode="tcx") == 1  # auto, on this 6.18 kernel
        assert "eBPF: attach backend tcx (auto: the kernel has tcx)" in run.stderr
        assert extra[node] == "", f"left attached on {node}:\n{extra[node]}"


@pytest.fixture()
def small_lab() -> Iterator[Lab]:
    t = Topology(
        nodes=(NodeSpec("n1"),),
        pods=(PodSpec("a", "n1"), PodSpec("b", "n1")),
        services=(ServiceSpec("s", 80, 8080, ("b",)),),
    )
    with Lab(t) as lab:
        yield lab


def test_interface_created_while_running_is_attached_and_counted(small_lab: Lab) -> None:
    """A pod (namespace + veth on the node bridge) made while the agent runs: its flows count."""
    lab = small_lab
    node_ns = lab.node_netns("n1")
    late = f"{lab.names.prefix}pod-late"
    ip4 = lab.topology.pod_cidr("n1", 4)[200]
    gw = lab.topology.bridge_ip("n1", 4)
    dst = lab.topology.pod_ip("b", 4)
    n, size = 300, 1000
    with agents(lab, ["n1"], poll=0.5, source="ebpf") as runs:
        nsu.run(["ip", "netns", "add", late])  # the lab's prefix: its teardown removes it too
        nsu.ip_batch(node_ns, [f"link add vplate type veth peer name eth0 netns {late}"])
        nsu.ip_batch(node_ns, ["link set vplate master cbr0", "link set vplate up"])
        nsu.ip_batch(late, ["link set lo up", f"addr add {ip4}/24 dev eth0", "link set eth0 up"])
        nsu.ip_batch(late, [f"route add default via {gw}"])
        time.sleep(1.5)  # the agent hears of the veth and attaches
        send = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', 40404))\n"
            f"for _ in range({n}): s.sendto(b'x' * {size}, ('{dst}', 9999))"
        )
        nsu.ns_run(late, [sys.executable, "-c", send])
        time.sleep(1.5)
        text = metrics_of(lab, "n1")
        nsu.ip_batch(node_ns, ["link del vplate"])
        time.sleep(1.0)
        after = metrics_of(lab, "n1")
    run = runs["n1"]
    assert run.proc.returncode == 0, run.stderr[-2000:]
    recs = [x for x in run.records if x["client_port"] == 40404 and x["transport"] == "udp"]
    assert recs, run.stderr[-2000:]
    assert sum(x["bytes_c2s"] for x in recs) == n * (size + 28)  # IPv4 + UDP headers: exact
    assert sum(x["packets_c2s"] for x in recs) == n
    assert len({x["flow_id"] for x in recs}) == 1
    assert metric(text, "otelflow_agent_ebpf_interfaces") == 4  # eth0, vp0, vp1, vplate
    assert metric(after, "otelflow_agent_ebpf_interfaces") == 3  # gone with the veth
    assert metric(text, "otelflow_agent_ebpf_attach_errors_total") == 0
    assert our_filters(lab, "n1") == []


def test_thousand_concurrent_flows_exact(small_lab: Lab) -> None:
    with agents(small_lab, ["n1"], poll=1.0, source="ebpf") as runs:
        flows = [FlowSpec("a", "b", up=500 + i, down=1500 + i, port=9200) for i in range(1000)]
        results = TrafficGenerator(small_lab, timeout=180).run(flows)
        time.sleep(2.5)
    bad = [r for r in results if not r.ok]
    assert not bad, bad[0].error
    by_port: dict[int, list[dict[str, Any]]] = {}
    for x in runs["n1"].records:
        by_port.setdefault(x["client_port"], []).append(x)
    mismatched = [r for r in results if totals(by_port.get(r.client_port, [])) != truth(r)]
    assert not mismatched, f"{len(mismatched)} of 1000 flows differ, e.g. port {mismatched[0].client_port}"
    assert all(len({x["flow_id"] for x in by_port[r.client_port]}) == 1 for r in results)


def test_small_map_reports_what_it_could_not_count(small_lab: Lab) -> None:
    """64 entries per interval, 1,000 flows in one interval: the rest is counted as dropped, never
    silently lost: what the records miss of the truth is at most what the drop counters say."""
    env = {"OTELFLOW_SOURCE__EBPF__MAX_ENTRIES": "64"}
    with agents(small_lab, ["n1"], poll=5.0, source="ebpf", extra_env=env) as runs:
        flows = [FlowSpec("a", "b", up=500, down=1500, port=9400) for _ in range(1000)]
        results = TrafficGenerator(small_lab, timeout=180).run(flows)
        time.sleep(6.0)
        text = metrics_of(small_lab, "n1")
    assert all(r.ok for r in results)
    by_port: dict[int, list[dict[str, Any]]] = {}
    for x in runs["n1"].records:
        by_port.setdefault(x["client_port"], []).append(x)
    missing_packets = 0
    for r in results:
        got = totals(by_port.get(r.client_port, []))
        want = truth(r)
        assert got[1] <= want[1] and got[3] <= want[3]  # never more than was sent
        missing_packets += (want[1] - got[1]) + (want[3] - got[3])
    dropped = metric(text, "otelflow_agent_ebpf_dropped_packets_total", reason="map_full")
    assert missing_packets > 0
    assert dropped >= missing_packets  # (also other packets of the node, e.g. neighbour discovery)
    assert metric(text, "otelflow_agent_ebpf_map_capacity") == 64
    assert "eBPF flow map full" in runs["n1"].stderr and "source.ebpf.max_entries" in runs["n1"].stderr


def test_auto_chooses_ebpf_here_and_says_why(small_lab: Lab) -> None:
    with agents(small_lab, ["n1"], poll=0.5, source="auto") as runs:
        [r] = TrafficGenerator(small_lab).run([FlowSpec("a", "svc/s", up=10_000, down=30_000)])
        time.sleep(1.5)
        text = metrics_of(small_lab, "n1")
    assert "flow source: ebpf (auto: kernel BTF, bpf() and TC attach all work)" in runs["n1"].stderr
    assert metric(text, "otelflow_agent_source", source="ebpf", requested="auto", reason="ebpf_ready") == 1
    recs = runs["n1"].flows_of(r)
    assert totals(recs) == truth(r) and all(x["source"] == "ebpf" and x["dnat"] for x in recs)


LOSS = """
table inet ofl_loss {
  counter dropped { }
  chain in {
    type filter hook input priority -300; policy accept;
    tcp dport 9500 meta length > 200 numgen random mod 20 == 0 counter name "dropped" drop
  }
}
"""


def lost_retransmits(text: str, stderr: str) -> int:
    """Retransmission events the agent reports it lost (every reason of
    otelflow_agent_ebpf_health_lost_events_total{feature="retransmits"}): from its /metrics, or from
    its last loss warning (cumulative, logged at exit too) if that says more (the final poll runs
    after the scrape)."""
    scraped = sum(
        int(metric(text, "otelflow_agent_ebpf_health_lost_events_total", reason=r, feature="retransmits"))
        for r in ("map_full", "kernel_skipped", "unjoined")
    )
    warned = [ln for ln in stderr.splitlines() if "TCP health: " in ln and " event(s) lost " in ln]
    logged = sum(int(n) for n in re.findall(r"retransmits=(\d+)", warned[-1])) if warned else 0
    return max(scraped, logged)


def within_loss(got: int, truth: int, lost: int, what: str) -> None:
    """got == truth, except for the events the agent reports lost (kernel_skipped is counted
    machine-wide: an upper bound of what this flow lost). With no loss reported: equality."""
    assert truth - lost <= got <= truth, f"{what}: got {got}, truth {truth}, reported lost {lost}"


def test_tcp_retransmits_per_direction_equal_the_sockets_own_count(small_lab: Lab) -> None:
    """The receiver drops 5% of the data segments: the flow's retransmits (c2s and s2c) equal what
    each side's socket says it retransmitted (TCP_INFO tcpi_total_retrans at close), but for the
    events the agent reports lost (otelflow_agent_ebpf_health_lost_events_total)."""
    nsu.nft_apply(small_lab.endpoint("b").netns, LOSS)
    with agents(small_lab, ["n1"], poll=0.5, source="ebpf") as runs:
        [r] = TrafficGenerator(small_lab).run([FlowSpec("a", "b", up=2_000_000, down=300_000, port=9500)])
        time.sleep(1.5)
        text = metrics_of(small_lab, "n1")
    assert r.ok, r.error
    assert r.up_retransmits > 0, "the loss rule made no retransmission"
    lost = lost_retransmits(text, runs["n1"].stderr)
    recs = runs["n1"].flows_of(r)
    assert totals(recs) == truth(r)
    c2s, s2c = sum(x["retransmits_c2s"] for x in recs), sum(x["retransmits_s2c"] for x in recs)
    within_loss(c2s, r.up_retransmits, lost, "retransmits c2s")
    within_loss(s2c, r.down_retransmits, lost, "retransmits s2c")
    within_loss(c2s + s2c, r.up_retransmits + r.down_retransmits, lost, "retransmits")
    assert sum(x["resets_c2s"] + x["resets_s2c"] for x in recs) == 0
    assert any(x["rtt_us_c2s"] for x in recs)  # the client's socket measured its RTT
    assert "TCP health: retransmits=tp_btf/tcp_retransmit_skb" in runs["n1"].stderr
    # and as metrics (this is the lab's only TCP flow; each direction is counted on this node)
    exported = sum(
        float(x.split()[-1]) for x in text.splitlines() if x.startswith("otelflow_tcp_retransmits_total{")
    )
    within_loss(int(exported), r.up_retransmits + r.down_retransmits, lost, "exported retransmits")


def test_long_flow_across_many_polls_is_one_flow_and_exact(small_lab: Lab) -> None:
    with agents(small_lab, ["n1"], poll=0.5, source="ebpf") as runs:
        spec = FlowSpec("a", "svc/s", up=400_000, down=800_000, duration=3.5)
        [r] = TrafficGenerator(small_lab).run([spec])
        time.sleep(1.5)
    assert r.ok, r.error
    recs = runs["n1"].flows_of(r)
    moving = [x for x in recs if x["bytes_c2s"] + x["bytes_s2c"] > 0]
    assert len(moving) >= 5  # counted in at least five polls
    assert totals(recs) == truth(r)
    assert len({x["flow_id"] for x in recs}) == 1 and all(x["dnat"] for x in recs)


def _tc_filters_named(lab: Lab, dev: str, name: str) -> list[str]:
    out = []
    for d in ("ingress", "egress"):
        text = nsu.ns_run(lab.node_netns("n1"), ["tc", "filter", "show", "dev", dev, d])
        out += [f"{d}: {x}" for x in text.splitlines() if name in x]
    return out


def test_forced_tc_backend_end_to_end(small_lab: Lab) -> None:
    """source.ebpf.attach: tc on a kernel that has tcx: cls_bpf filters on clsact, exact counts,
    nothing left after the agent exits."""
    lab = small_lab
    nsp = f"{nsu.NETNS_RUN_DIR}/{lab.node_netns('n1')}"
    env = {"OTELFLOW_SOURCE__EBPF__ATTACH": "tc"}
    with agents(lab, ["n1"], poll=0.5, source="ebpf", extra_env=env) as runs:
        attached = _tc_filters_named(lab, "vp0", "otelflow_")
        tcx_while = tcx_left(nsp, lab.interfaces()[lab.node_netns("n1")])
        [r] = TrafficGenerator(lab).run([FlowSpec("a", "svc/s", up=60_000, down=90_000)])
        time.sleep(1.5)
        text = metrics_of(lab, "n1")
    assert r.ok, r.error
    run = runs["n1"]
    assert run.proc.returncode == 0, run.stderr[-2000:]
    assert "eBPF: attach backend tc (requested (source.ebpf.attach=tc))" in run.stderr
    assert len(attached) == 2 and "otelflow_in" in attached[0] and "otelflow_out" in attached[1], attached
    assert tcx_while == []
    assert metric(text, "otelflow_agent_ebpf_attach", mode="tc") == 1
    recs = run.flows_of(r)
    assert (
        totals(recs) == truth(r) and len({x["flow_id"] for x in recs}) == 1 and all(x["dnat"] for x in recs)
    )
    assert our_filters(lab, "n1") == []


def test_a_sigkilled_agent_leaves_no_tcx_link(small_lab: Lab) -> None:
    """SIGKILL cannot be handled: with tcx the kernel detaches the links as it closes the dead
    process's fds (with cls_bpf the filters would stay until the next start replaces them)."""
    lab = small_lab
    nsp = f"{nsu.NETNS_RUN_DIR}/{lab.node_netns('n1')}"
    with agents(lab, ["n1"], poll=0.5, source="ebpf") as runs:
        chains = {d: tcx_chain(nsp, "vp0", d) for d in ("ingress", "egress")}
        runs["n1"].proc.kill()
        runs["n1"].proc.wait(timeout=20)
    assert runs["n1"].proc.returncode == -9
    assert [len(c) for c in chains.values()] == [1, 1], chains  # ours, while it ran
    assert our_filters(lab, "n1") == []
