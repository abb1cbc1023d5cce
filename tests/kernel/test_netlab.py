"""netlab is the ground truth for every source: prove that its traffic arrives exactly, that node
conntrack sees it where it should, and that the lab's independent counters agree with both."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import pytest

from otelflow.netlab import ns as nsu
from otelflow.netlab.ctcli import CtRow, conntrack_rows
from otelflow.netlab.lab import Lab, list_labs
from otelflow.netlab.topology import NodeSpec, PodSpec, ServiceSpec, Topology, demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator

# (name, client, server, nodes whose conntrack must see the flow)
SCENARIOS = [
    ("same-node", "frontend-0", "cart-0", ["node-a"]),
    ("cross-node", "frontend-0", "db-0", ["node-a", "node-b"]),
    ("clusterip", "frontend-1", "svc/payments", None),  # nodes depend on the chosen backend
    ("external", "cart-0", "internet", ["node-a"]),
    ("from-external", "internet", "db-0", ["node-b"]),
    ("host-network-client", "node-exporter-a", "db-0", ["node-a", "node-b"]),
]
IP_HDR = {4: 20, 6: 40}


def entry_for(rows: list[CtRow], r: FlowResult) -> CtRow:
    """The conntrack entry of a generator flow (identified by its unique client port)."""
    proto = r.spec.proto
    hits = [x for x in rows if x.proto == proto and x.orig.get("sport") == str(r.client_port)]
    assert len(hits) == 1, f"expected one entry for client port {r.client_port}, found {len(hits)}"
    return hits[0]


def nodes_for(lab: Lab, r: FlowResult, expected: list[str] | None) -> list[str]:
    if expected is not None:
        return expected
    nodes = {lab.endpoint(r.spec.client).node, lab.endpoint(r.server_endpoint).node}
    return sorted(n for n in nodes if n)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(("name", "client", "server", "nodes"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario_delivers_exactly_and_conntrack_agrees_with_truth(
    demo_lab: Lab, name: str, client: str, server: str, nodes: list[str] | None, family: int
) -> None:
    up, down = 300_000 + family, 1_200_000 + family
    [r] = TrafficGenerator(demo_lab).run([FlowSpec(client, server, up=up, down=down, family=family)])  # type: ignore[arg-type]
    assert r.error is None
    assert (r.up_sent, r.up_received, r.down_sent, r.down_received) == (up, up, down, down)
    # the truth counters saw every packet: at least the payload plus an IP + TCP header each
    assert r.up_l3_bytes >= up + (IP_HDR[family] + 20) * r.up_l3_packets
    assert r.down_l3_bytes >= down + (IP_HDR[family] + 20) * r.down_l3_packets
    if server.startswith("svc/"):
        assert r.server_endpoint in demo_lab.topology.service(server[4:]).backends
    for node in nodes_for(demo_lab, r, nodes):
        e = entry_for(conntrack_rows(demo_lab.node_netns(node)), r)
        # conntrack in every node on the path counts exactly what the client's own stack counted
        assert (e.count("orig", "bytes"), e.count("orig", "packets")) == (r.up_l3_bytes, r.up_l3_packets), (
            node
        )
        assert (e.count("reply", "bytes"), e.count("reply", "packets")) == (
            r.down_l3_bytes,
            r.down_l3_packets,
        ), node
        assert ipaddress.ip_address(e.orig["src"]) == ipaddress.ip_address(r.client_ip)
        if name == "clusterip" and node == demo_lab.endpoint(client).node:
            # the client's node DNATs: the reply comes from the backend pod, not the ClusterIP
            assert e.orig["dst"] == r.dialed_ip
            assert ipaddress.ip_address(e.reply["src"]) == demo_lab.endpoint(r.server_endpoint).ip(family)
        if name == "external":
            # node egress is masqueraded: the reply is addressed to the node, not the pod
            assert ipaddress.ip_address(e.reply["dst"]) == demo_lab.topology.node_ip("node-a", family)


@pytest.mark.parametrize("family", [4, 6])
def test_udp_bytes_are_payload_plus_headers_exactly(demo_lab: Lab, family: int) -> None:
    spec = FlowSpec(
        "frontend-0", "svc/dns", proto="udp", up=10 * 500, down=20 * 500, datagram=500, family=family
    )  # type: ignore[arg-type]
    [r] = TrafficGenerator(demo_lab).run([spec])
    assert r.ok, r.error
    hdr = IP_HDR[family] + 8
    assert (r.up_l3_packets, r.up_l3_bytes) == (10, 10 * (500 + hdr))
    assert (r.down_l3_packets, r.down_l3_bytes) == (20, 20 * (500 + hdr))
    e = entry_for(conntrack_rows(demo_lab.node_netns("node-a")), r)
    assert (e.count("orig", "packets"), e.count("orig", "bytes")) == (10, 10 * (500 + hdr))
    assert (e.count("reply", "packets"), e.count("reply", "bytes")) == (20, 20 * (500 + hdr))
    assert ipaddress.ip_address(e.reply["src"]) == demo_lab.endpoint("cart-0").ip(family)


def test_long_flow_spans_time_and_counters_grow(demo_lab: Lab) -> None:
    gen = TrafficGenerator(demo_lab)
    fut = gen.start([FlowSpec("payments-0", "svc/db", up=600_000, down=600_000, duration=3.0)])
    time.sleep(1.5)
    mid = [
        x
        for x in conntrack_rows(demo_lab.node_netns("node-b"))
        if x.proto == "tcp" and x.orig.get("dport") == "5432"
    ]
    [r] = fut.result(timeout=60)
    assert r.ok, r.error
    assert r.finished - r.started >= 2.5
    mid_e = [x for x in mid if x.orig.get("sport") == str(r.client_port)]
    assert len(mid_e) == 1
    assert 0 < mid_e[0].count("orig", "bytes") < r.up_l3_bytes  # half-way through, partly counted
    e = entry_for(conntrack_rows(demo_lab.node_netns("node-b")), r)
    assert e.count("orig", "bytes") == r.up_l3_bytes and e.count("reply", "bytes") == r.down_l3_bytes


def test_many_concurrent_short_flows(demo_lab: Lab) -> None:
    flows = [
        FlowSpec("frontend-1" if i % 2 else "cart-0", "payments-0", up=1000 + i, down=3000 + i, port=9000)
        for i in range(400)
    ]
    results = TrafficGenerator(demo_lab).run(flows)
    bad = [r for r in results if not r.ok]
    assert not bad, f"{len(bad)} flows incomplete, e.g. {bad[0].error}"
    rows = conntrack_rows(demo_lab.node_netns("node-b"), "-p", "tcp", "--dport", "9000")
    by_port = {int(x.orig["sport"]): x for x in rows}
    assert sum(by_port[r.client_port].count("orig", "bytes") for r in results) == sum(
        r.up_l3_bytes for r in results
    )
    assert sum(by_port[r.client_port].count("reply", "bytes") for r in results) == sum(
        r.down_l3_bytes for r in results
    )


def test_conntrack_accounting_is_on_in_every_node(demo_lab: Lab) -> None:
    for n in demo_lab.topology.nodes:
        out = nsu.ns_run(demo_lab.node_netns(n.name), ["sysctl", "-n", "net.netfilter.nf_conntrack_acct"])
        assert out.strip() == "1"


def test_offloads_on_lab_still_delivers() -> None:
    t = Topology(
        nodes=(NodeSpec("n1"), NodeSpec("n2")), pods=(PodSpec("a", "n1"), PodSpec("b", "n2")), offloads=True
    )
    with Lab(t) as lab:
        [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=2_000_000, down=10)])
        assert r.ok, r.error
        e = entry_for(conntrack_rows(lab.node_netns("n1")), r)
        # with offloads the node sees GSO super-packets: fewer packets than on the wire, same payload
        assert e.count("orig", "packets") <= r.up_l3_packets


def test_ipv4_only_lab() -> None:
    t = Topology(
        nodes=(NodeSpec("n1"),),
        pods=(PodSpec("a", "n1"), PodSpec("b", "n1")),
        services=(ServiceSpec("s", 80, 8080, ("b",)),),
        ipv6=False,
    )
    with Lab(t) as lab:
        [r] = TrafficGenerator(lab).run([FlowSpec("a", "svc/s", up=1000, down=1000)])
        assert r.ok, r.error
        with pytest.raises(nsu.NetlabError):
            lab.endpoint("a").ip(6)


def test_teardown_removes_namespaces_and_kills_processes() -> None:
    t = Topology(nodes=(NodeSpec("n1"),), pods=(PodSpec("a", "n1"),))
    lab = Lab(t)
    lab.up()
    pod_ns = lab.names.pod("a")
    proc = subprocess.Popen(["ip", "netns", "exec", pod_ns, "sleep", "300"])
    time.sleep(0.2)
    assert nsu.netns_pids(pod_ns)
    lab.down()
    assert proc.wait(timeout=10) != 0
    assert not nsu.list_netns(lab.names.prefix)


def test_a_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(demo_topology())

    def boom(self: Lab, ext: str) -> None:
        raise nsu.NetlabError("injected failure")

    monkeypatch.setattr(Lab, "_build_external", boom)
    with pytest.raises(nsu.NetlabError, match="injected"):
        lab.up()
    assert not nsu.list_netns(lab.names.prefix)


def test_cli_up_list_down() -> None:
    env = {**os.environ}
    lab_id = "clitest" + str(os.getpid() % 1000)
    cmd = [sys.executable, "-m", "otelflow", "netlab"]
    try:
        up = subprocess.run(
            [*cmd, "up", "--id", lab_id], capture_output=True, text=True, env=env, timeout=120
        )
        assert up.returncode == 0, up.stderr
        assert f"lab {lab_id} is up" in up.stdout
        ls = subprocess.run([*cmd, "list"], capture_output=True, text=True, timeout=60)
        assert lab_id in ls.stdout
        again = subprocess.run([*cmd, "up", "--id", lab_id], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already exists" in again.stderr
    finally:
        down = subprocess.run([*cmd, "down", lab_id], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and f"removed 1 lab(s): {lab_id}" in down.stdout
    assert lab_id not in list_labs()
