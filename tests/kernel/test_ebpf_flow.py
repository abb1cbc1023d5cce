"""The TC flow counter (bpf/flow.bpf.c via otelflow.ebpf.loader) against independent kernel counters.

The counter runs in each lab node's namespace, attached to the host side of every pod veth (the
`vpN` ports of `cbr0`), with the bridge covered, as the agent will run it. Every flow's bytes and
packets, per direction, must equal an independent count exactly:

- offloads off (the lab's default): the lab's truth counters (nftables in the client's own
  namespace, output hook = client->server, input hook = server->client), which see the same
  wire-sized packets as every hop;
- offloads on (kernel defaults: pods send TSO/GSO super-packets): the truth counters at the
  client's output hook see super-packets, not the wire. The reference is then the RECEIVER's input
  hook, with segmentation forced just after our hooks (TSO/GSO off on the host side of the pod
  veths and on the fabric port of the external host, the way a NIC segments on transmit) and GRO
  off at the receivers (the veth default): the receiver counts exactly the segments the wire
  carries, while our programs see the super-packets and must arrive at the same numbers by
  arithmetic. UDP GSO (UDP_SEGMENT) gives a second, purely arithmetic reference.

Both attach backends: tcx links (first in the interface's tcx chain; the default here, kernel 6.18)
and cls_bpf filters on clsact (``attach_mode="tc"``). The scenario table and the UDP GSO cases run
under both; the tests that inspect tc filters force "tc"; the tcx tests check the chain order with
BPF_PROG_QUERY (tests/kernel/tcx.py).

Also: overflow of a small map is counted, foreign tc filters keep working and are never replaced,
a foreign tcx program keeps working and one that drops packets after ours does not hide them, and
nothing stays attached after close, an exception, SIGTERM, or SIGKILL (tc: replaced at the next
start; tcx: gone with the process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from otelflow.ebpf import libbpf as lb
from otelflow.ebpf.loader import DROP_NAMES, EbpfError, FlowCount, FlowCounter
from otelflow.netlab import ns as nsu
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import ExternalSpec, NodeSpec, PodSpec, Topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator
from tests.kernel.tcx import ETH_HLEN, TCX_DROP, TCX_NEXT, foreign_tcx, tcx_chain, tcx_left

NODES = ["node-a", "node-b"]
PROTO = {"tcp": 6, "udp": 17}
IP_HDR = {4: 20, 6: 40}
Key = tuple[str, str, int, int, int]

# name -> (client, server, proto)
SCENARIOS: dict[str, tuple[str, str, str]] = {
    "same-node": ("frontend-0", "cart-0", "tcp"),
    "cross-node": ("frontend-0", "db-0", "tcp"),
    "clusterip": ("frontend-1", "svc/payments", "tcp"),
    "to-external": ("cart-0", "internet", "tcp"),
    "from-external": ("internet", "db-0", "tcp"),
    "udp-same-node": ("frontend-0", "payments-1", "udp"),
    "udp-cross-node": ("frontend-0", "db-0", "udp"),
    "udp-to-external": ("cart-0", "internet", "udp"),
    "udp-clusterip": ("frontend-0", "svc/dns", "udp"),
}


def netns_path(lab: Lab, node: str) -> str:
    return f"{nsu.NETNS_RUN_DIR}/{lab.node_netns(node)}"


def counter_on(lab: Lab, node: str, **kw: Any) -> FlowCounter:
    """A flow counter on every pod veth of a node, with the pod bridge covered (the agent's setup)."""
    fc = FlowCounter(netns=netns_path(lab, node), **kw)
    try:
        for k in range(len(lab.topology.pods_on(node))):
            fc.attach(f"vp{k}")
        fc.cover("cbr0")
    except BaseException:
        fc.close()
        raise
    return fc


def expected_keys(lab: Lab, node: str, r: FlowResult) -> tuple[Key | None, Key | None]:
    """(up key, down key) under which `node` counts a flow: at the first hook on the node, i.e.
    the sender's veth ingress when the sender is a pod of this node (addresses before any NAT),
    else the receiver's veth egress (addresses after NAT)."""
    proto = PROTO[r.spec.proto]
    c_node = lab.endpoint(r.spec.client).node
    s_node = lab.endpoint(r.server_endpoint).node
    up: Key | None = None
    down: Key | None = None
    if node == c_node:
        up = (r.client_ip, r.dialed_ip, r.client_port, r.dialed_port, proto)
    elif node == s_node:
        up = (r.client_ip, r.server_ip, r.client_port, r.server_port, proto)
    if node == s_node:
        down = (r.server_ip, r.client_ip, r.server_port, r.client_port, proto)
    elif node == c_node:
        down = (r.dialed_ip, r.client_ip, r.dialed_port, r.client_port, proto)
    return up, down


def by_key(flows: list[FlowCount]) -> dict[Key, FlowCount]:
    out = {f.tuple5(): f for f in flows}
    assert len(out) == len(flows), "a drain returned one flow twice"
    return out


# ---- offloads off: the lab's truth counters -------------------------------------------------------
@pytest.fixture(scope="module", params=["tc", "tcx"])
def scenario_run(
    demo_lab: Lab, request: pytest.FixtureRequest
) -> tuple[Lab, dict[tuple[str, int], FlowResult], dict[str, Any]]:
    """Every scenario in both families, concurrently, counted on both nodes, drained once; once per
    attach backend."""
    specs, names = [], []
    for name, (client, server, proto) in SCENARIOS.items():
        for fam in (4, 6):
            if proto == "tcp":
                specs.append(FlowSpec(client, server, family=fam, up=200_000 + fam, down=700_000 + fam))  # type: ignore[arg-type]
            else:
                spec = FlowSpec(client, server, "udp", fam, up=12_000, down=18_000 + fam, datagram=600)  # type: ignore[arg-type]
                specs.append(spec)
            names.append((name, fam))
    fcs = {n: counter_on(demo_lab, n, attach_mode=request.param) for n in NODES}
    try:
        assert all(fc.attach_mode == request.param for fc in fcs.values())
        results = TrafficGenerator(demo_lab).run(specs)
        drains = {n: fc.drain() for n, fc in fcs.items()}
    finally:
        for fc in fcs.values():
            fc.close()
    return demo_lab, dict(zip(names, results, strict=True)), drains


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_counts_equal_the_truth_counters_exactly(scenario_run: Any, name: str, family: int) -> None:
    lab, results, drains = scenario_run
    r: FlowResult = results[(name, family)]
    assert r.ok, r.error
    seen = 0
    for node in NODES:
        flows = by_key(drains[node].flows)
        up, down = expected_keys(lab, node, r)
        if up:
            f = flows.get(up)
            assert f is not None, f"{node}: no entry {up}"
            assert (f.packets, f.bytes) == (r.up_l3_packets, r.up_l3_bytes), f"{name} up on {node}"
            assert f.family == family
            seen += 1
        if down:
            f = flows.get(down)
            assert f is not None, f"{node}: no entry {down}"
            assert (f.packets, f.bytes) == (r.down_l3_packets, r.down_l3_bytes), f"{name} down on {node}"
            seen += 1
        # count once per node: nothing else on this node mentions the flow's client port
        mine = [
            f
            for f in drains[node].flows
            if r.client_port in (f.sport, f.dport) and f.proto == PROTO[r.spec.proto]
        ]
        expected = (r.up_l3_bytes if up else 0) + (r.down_l3_bytes if down else 0)
        assert sum(f.bytes for f in mine) == expected, f"{name} on {node}: counted twice or under another key"
    assert seen >= 2


def test_tcp_flags_timestamps_and_interfaces(scenario_run: Any) -> None:
    lab, results, drains = scenario_run
    r = results[("same-node", 4)]
    up, _ = expected_keys(lab, "node-a", r)
    assert up is not None
    f = by_key(drains["node-a"].flows)[up]
    syn, ack, fin = 0x02, 0x10, 0x01
    assert f.tcp_flags & (syn | ack | fin) == syn | ack | fin
    assert drains["node-a"].since_ns <= f.first_seen_ns <= f.last_seen_ns <= drains["node-a"].until_ns
    assert f.ifindex > 0


def test_nothing_lost_or_unparsed(scenario_run: Any) -> None:
    lab, results, drains = scenario_run
    # nodes where a pod talked to a pod of the same node (the ClusterIP scenario's backend is
    # whichever kube-proxy-like DNAT picked, so node-b may or may not have one)
    same_node = {
        lab.endpoint(r.spec.client).node
        for r in results.values()
        if lab.endpoint(r.spec.client).node == lab.endpoint(r.server_endpoint).node
    }
    assert "node-a" in same_node
    for node in NODES:
        d = drains[node]
        assert all(v == 0 for v in d.drops.values()), d.drops
        assert d.stats["l3_bad"] == d.stats["l4_truncated"] == d.stats["no_map"] == 0, d.stats
        if node in same_node:  # same-node traffic met a second hook (the receiver's veth egress): skipped
            assert d.stats["egress_skipped"] > 0, (node, d.stats)
        assert d.stats["gso_packets"] == 0  # offloads off: no super-packets


def test_hairpin_through_a_service_counts_once(demo_lab: Lab) -> None:
    # cart-0 dials the dns Service and is its own backend: DNAT plus masquerade (behind the bridge's
    # address) send each packet out of the pod and back in; the second pass enters the stack through
    # cbr0, which is covered, so each packet still counts once, at cart-0's veth ingress
    specs = [
        FlowSpec("cart-0", "svc/dns", proto="udp", family=f, up=6000, down=9000, datagram=600)  # type: ignore[arg-type]
        for f in (4, 6)
    ]
    with counter_on(demo_lab, "node-a") as fc:
        results = TrafficGenerator(demo_lab).run(specs)
        d = fc.drain()
    flows = by_key(d.flows)
    for r in results:
        assert r.ok, r.error
        assert r.server_endpoint == "cart-0"
        masq = str(demo_lab.topology.bridge_ip("node-a", r.spec.family))
        up = flows[(r.client_ip, r.dialed_ip, r.client_port, r.dialed_port, 17)]
        down = flows[(r.server_ip, masq, r.server_port, r.client_port, 17)]  # as the backend sent it
        assert (up.packets, up.bytes) == (r.up_l3_packets, r.up_l3_bytes)
        assert (down.packets, down.bytes) == (r.down_l3_packets, r.down_l3_bytes)
        mine = [f for f in d.flows if r.client_port in (f.sport, f.dport) and f.proto == 17]
        assert sum(f.bytes for f in mine) == r.up_l3_bytes + r.down_l3_bytes


def test_long_flows_drained_many_times_add_up_exactly(demo_lab: Lab) -> None:
    specs = [
        FlowSpec("frontend-0", "db-0", up=1_500_000, down=1_500_000, duration=3.0),
        FlowSpec(
            "cart-0", "internet", proto="udp", family=6, up=300_000, down=300_000, datagram=1000, duration=3.0
        ),
    ]
    fcs = {n: counter_on(demo_lab, n) for n in NODES}
    sums: dict[str, dict[Key, list[int]]] = {n: defaultdict(lambda: [0, 0, 0]) for n in NODES}
    try:
        fut = TrafficGenerator(demo_lab).start(specs)
        while True:
            done = fut.done()
            time.sleep(0.1)
            for n, fc in fcs.items():
                for f in fc.drain().flows:
                    s = sums[n][f.tuple5()]
                    s[0] += f.packets
                    s[1] += f.bytes
                    s[2] += 1
            if done:
                break
        results = fut.result()
    finally:
        for fc in fcs.values():
            fc.close()
    for r in results:
        assert r.ok, r.error
        for node in NODES:
            for key, (pk, nb) in zip(
                expected_keys(demo_lab, node, r),
                [(r.up_l3_packets, r.up_l3_bytes), (r.down_l3_packets, r.down_l3_bytes)],
                strict=True,
            ):
                if key is None:
                    continue
                got = sums[node][key]
                assert (got[0], got[1]) == (pk, nb), f"{r.spec} on {node}"
                assert got[2] >= 10, "the flow should have spanned many drains"


# ---- offloads on: the receivers' counters ---------------------------------------------------------------
REF_RULESET = """
table inet ebpf_ref {
  set rx {
    type inet_proto . inet_service
    counter
  }
  chain in {
    type filter hook input priority -400; policy accept;
    meta l4proto . th dport @rx
  }
}
"""


def read_ref(netns: str) -> dict[tuple[str, int], tuple[int, int]]:
    doc = json.loads(nsu.ns_run(netns, ["nft", "-j", "list", "set", "inet", "ebpf_ref", "rx"]))
    out = {}
    for item in doc["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            proto, port = e["elem"]["val"]["concat"]
            c = e["elem"]["counter"]
            out[(proto, int(port))] = (int(c["packets"]), int(c["bytes"]))
    return out


OFFLOAD_TOPOLOGY = Topology(
    nodes=(NodeSpec("n1"), NodeSpec("n2")),
    pods=(PodSpec("a", "n1"), PodSpec("b", "n1"), PodSpec("c", "n2")),
    externals=(ExternalSpec("ext"),),
    offloads=True,
)
# (client, server, server port base)
OFFLOAD_FLOWS = [("a", "b", 15000), ("a", "c", 15100), ("a", "ext", 15200), ("ext", "a", 15300)]


@pytest.fixture(scope="module")
def offload_lab() -> Iterator[Lab]:
    with Lab(OFFLOAD_TOPOLOGY) as lab:
        # segment right after our hooks, where a NIC would: TSO/GSO off on the transmit side
        # toward every receiver (host side of the pod veths; the fabric's port to the external host)
        for node in ("n1", "n2"):
            for k in range(len(OFFLOAD_TOPOLOGY.pods_on(node))):
                nsu.ns_run(lab.node_netns(node), ["ethtool", "-K", f"vp{k}", "tso", "off", "gso", "off"])
        nsu.ns_run(lab.names.router(), ["ethtool", "-K", "x1", "tso", "off", "gso", "off"])
        for name in ("a", "b", "c", "ext"):
            ep = lab.endpoint(name)
            out = nsu.ns_run(ep.netns, ["ethtool", "-k", "eth0"])
            assert "generic-receive-offload: off" in out  # veth default: receivers see segments
            assert "tcp-segmentation-offload: on" in out  # senders build super-packets
            nsu.nft_apply(ep.netns, REF_RULESET)
        yield lab


def test_offloads_on_counts_wire_bytes_of_super_packets(offload_lab: Lab) -> None:
    lab = offload_lab
    specs = []
    for client, server, base in OFFLOAD_FLOWS:
        for fam in (4, 6):
            port = base + fam
            nsu.nft_apply(lab.endpoint(server).netns, f"add element inet ebpf_ref rx {{ tcp . {port} }}\n")
            specs.append(FlowSpec(client, server, family=fam, up=2_000_000, down=600_000, port=port))  # type: ignore[arg-type]
    fcs = {n: counter_on(lab, n) for n in ("n1", "n2")}
    try:
        results = TrafficGenerator(lab).run(specs)
        drains = {n: fc.drain() for n, fc in fcs.items()}
    finally:
        for fc in fcs.values():
            fc.close()
    for r in results:
        assert r.ok, r.error
        up_ref = read_ref(lab.endpoint(r.server_endpoint).netns)[("tcp", r.server_port)]
        down_ref = (r.down_l3_packets, r.down_l3_bytes)  # the client's input hook: wire segments
        # the client's output hook saw super-packets: fewer packets than the wire carried
        assert r.up_l3_packets < up_ref[0], "expected TSO super-packets at the sender"
        checked = 0
        for node in ("n1", "n2"):
            flows = by_key(drains[node].flows)
            up, down = expected_keys(lab, node, r)
            if up:
                f = flows[up]
                assert (f.packets, f.bytes) == up_ref, (
                    f"{r.spec.client}->{r.spec.server} v{r.spec.family} up on {node}"
                )
                checked += 1
            if down:
                f = flows[down]
                assert (f.packets, f.bytes) == down_ref, (
                    f"{r.spec.client}->{r.spec.server} v{r.spec.family} down on {node}"
                )
                checked += 1
        assert checked >= 2
    for node in ("n1", "n2"):
        assert drains[node].stats["gso_packets"] > 0, "the programs never saw a GSO packet"
        assert all(v == 0 for v in drains[node].drops.values())


def _udp_gso_roundtrip(
    lab: Lab, client: str, server: str, family: int, seg: int, nseg: int, port: int
) -> int:
    """Send one UDP_SEGMENT write of nseg datagrams; return the source port (receiver gets nseg)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    c_ep, s_ep = lab.endpoint(client), lab.endpoint(server)
    srv = nsu.socket_in(s_ep.netns, af, socket.SOCK_DGRAM)
    cli = nsu.socket_in(c_ep.netns, af, socket.SOCK_DGRAM)
    try:
        srv.bind((str(s_ep.ip(family)), port))
        srv.settimeout(5)
        cli.bind((str(c_ep.ip(family)), 0))
        cli.setsockopt(socket.IPPROTO_UDP, 103, seg)  # UDP_SEGMENT
        cli.sendto(b"u" * (seg * nseg), (str(s_ep.ip(family)), port))
        sizes = [len(srv.recv(65535)) for _ in range(nseg)]
        assert sizes == [seg] * nseg
        return cli.getsockname()[1]
    finally:
        srv.close()
        cli.close()


@pytest.mark.parametrize("mode", ["tc", "tcx"])
@pytest.mark.parametrize("family", [4, 6])
def test_udp_gso_super_packet_counts_as_its_datagrams(offload_lab: Lab, family: int, mode: str) -> None:
    lab = offload_lab
    seg, nseg = 1200, 10
    with counter_on(lab, "n1", attach_mode=mode) as fc:
        fc.drain()
        sport = _udp_gso_roundtrip(lab, "a", "b", family, seg, nseg, 16000 + family)
        d = fc.drain()
    key = (str(lab.endpoint("a").ip(family)), str(lab.endpoint("b").ip(family)), sport, 16000 + family, 17)
    f = by_key(d.flows)[key]
    assert (f.packets, f.bytes) == (nseg, nseg * (seg + IP_HDR[family] + 8))
    assert d.stats["gso_packets"] >= 1  # it crossed the veth as one skb


@pytest.mark.parametrize("mode", ["tc", "tcx"])
def test_udp_gso_segmented_before_the_hook_counts_the_same(demo_lab: Lab, mode: str) -> None:
    # offloads off: the stack segments before the pod's veth, the program sees ten plain packets
    with counter_on(demo_lab, "node-a", attach_mode=mode) as fc:
        fc.drain()
        sport = _udp_gso_roundtrip(demo_lab, "frontend-0", "cart-0", 4, 1000, 10, 16100)
        d = fc.drain()
    key = (
        str(demo_lab.endpoint("frontend-0").ip(4)),
        str(demo_lab.endpoint("cart-0").ip(4)),
        sport,
        16100,
        17,
    )
    f = by_key(d.flows)[key]
    assert (f.packets, f.bytes) == (10, 10 * 1028)
    assert d.stats["gso_packets"] == 0


# ---- a small lab for overflow and coexistence -------------------------------------------------------------
@pytest.fixture(scope="module")
def small_lab() -> Iterator[Lab]:
    t = Topology(nodes=(NodeSpec("n1"),), pods=(PodSpec("a", "n1"), PodSpec("b", "n1")), ipv6=False)
    with Lab(t) as lab:
        node = lab.node_netns("n1")
        bh = f"{lab.names.prefix}blackhole"  # the lab's prefix: removed with the lab
        nsu.run(["ip", "netns", "add", bh])
        nsu.ip_batch(node, [f"link add mir0 type veth peer name mir1 netns {bh}", "link set mir0 up"])
        nsu.ip_batch(bh, ["link set mir1 up"])
        yield lab


def tc(lab: Lab, *args: str) -> Any:
    out = nsu.ns_run(lab.node_netns("n1"), ["tc", "-s", "-j", *args]).strip()
    return json.loads(out) if out else []


def filters(lab: Lab, dev: str, hook: str) -> list[dict[str, Any]]:
    return [f for f in tc(lab, "filter", "show", "dev", dev, hook) if "options" in f]


def has_clsact(lab: Lab, dev: str) -> bool:
    return any(q.get("kind") == "clsact" for q in tc(lab, "qdisc", "show", "dev", dev))


def foreign_filter(lab: Lab, dev: str, hook: str, prio: int, kind: str, control: str) -> None:
    """Someone else's filter matching every packet and mirroring it to mir0 (its copies end in a
    namespace that drops them): classic BPF ("bpf", handle 1) or "u32". `control` is what happens
    next: 'continue' lets later filters run, 'pipe' (mirred's default) ends classification.
    (This kernel has neither cls_matchall nor act_gact: mirred is the action it offers.)"""
    node = lab.node_netns("n1")
    if not has_clsact(lab, dev):
        nsu.ns_run(node, ["tc", "qdisc", "add", "dev", dev, "clsact"])
    cmd = ["tc", "filter", "add", "dev", dev, hook, "prio", str(prio)]
    if kind == "bpf":
        cmd += ["handle", "1", "bpf", "bytecode", "1,6 0 0 4294967295,"]
    else:
        cmd += ["u32", "match", "u32", "0", "0"]
    cmd += ["action", "mirred", "egress", "mirror", "dev", "mir0", control]
    nsu.ns_run(node, cmd)


def foreign_packets(lab: Lab, dev: str, hook: str) -> int:
    """Packets the foreign filters on a hook acted on (their mirred action's counter)."""
    return sum(
        int(a["stats"]["packets"]) for f in filters(lab, dev, hook) for a in f["options"].get("actions", [])
    )


def reset(lab: Lab, dev: str) -> None:
    node = lab.node_netns("n1")
    if has_clsact(lab, dev):
        nsu.ns_run(node, ["tc", "qdisc", "del", "dev", dev, "clsact"])


def prog_exists(prog_id: int) -> bool:
    fd = lb.lib().bpf_prog_get_fd_by_id(prog_id)  # -ENOENT once the kernel freed it
    if fd >= 0:
        os.close(fd)
    return fd >= 0


def progs_gone(ids: Any, timeout: float = 10.0) -> bool:
    """True once none of the programs exists: a detached filter frees its program after an RCU
    grace period and a work item, so a program can outlive its filter by a few milliseconds."""
    deadline = time.monotonic() + timeout
    while any(prog_exists(i) for i in ids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_map_overflow_is_counted_never_silent(small_lab: Lab) -> None:
    lab = small_lab
    n_flows, payload = 1000, 100
    specs = [FlowSpec("a", "b", proto="udp", up=payload, down=0, port=9100, datagram=payload)] * n_flows
    with FlowCounter(netns=netns_path(lab, "n1"), max_entries=64) as fc:
        # only what pod a sends: the bridge floods its own IGMP reports out of every port's egress,
        # which would take map slots (or drop counts) at random moments
        fc.attach("vp0", egress=False)
        results = TrafficGenerator(lab).run(specs)
        d = fc.drain()
    assert all(r.ok for r in results)
    ours = [f for f in d.flows if f.dport == 9100]
    assert len(ours) == 64 == len(d.flows)
    assert d.drops["map_full_packets"] == n_flows - 64
    # every flow is either counted or in the drop counters, packets and bytes alike
    assert sum(f.packets for f in ours) + d.drops["map_full_packets"] == sum(r.up_l3_packets for r in results)
    assert sum(f.bytes for f in ours) + d.drops["map_full_bytes"] == sum(r.up_l3_bytes for r in results)
    assert sum(r.up_l3_bytes for r in results) == n_flows * (payload + 28)
    assert d.drops["other_packets"] == 0 and set(d.drops) == set(DROP_NAMES)


def test_foreign_filter_before_ours_keeps_working_and_is_never_replaced(small_lab: Lab) -> None:
    lab = small_lab
    foreign_filter(lab, "vp0", "ingress", prio=1, kind="u32", control="continue")
    try:
        with FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tc") as fc:
            with pytest.raises(EbpfError, match="priority 1 is taken by a u32 filter"):
                fc.attach("vp0")  # our default priority holds another kind: refuse, never replace
            att = fc.attach("vp0", priority=2)
            assert not att.created_clsact
            assert [(f.kind, f.priority) for f in att.hooks["ingress"].preceding] == [("u32", 1)]
            fc.attach("vp1", priority=2)
            before = foreign_packets(lab, "vp0", "ingress")
            [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=100_000, down=300_000)])
            d = fc.drain()
            ids = fc.prog_ids
        assert r.ok
        # theirs saw every packet a sent, and ours (after theirs: 'continue') counted them exactly
        f = by_key(d.flows)[(r.client_ip, r.dialed_ip, r.client_port, r.dialed_port, 6)]
        assert (f.packets, f.bytes) == (r.up_l3_packets, r.up_l3_bytes)
        assert foreign_packets(lab, "vp0", "ingress") - before >= r.up_l3_packets
        # after close: their filter and their clsact are still there, and still work; ours are gone
        assert {x["kind"] for x in filters(lab, "vp0", "ingress")} == {"u32"}  # its table + its rule
        assert filters(lab, "vp0", "egress") == [] and has_clsact(lab, "vp0")
        assert not has_clsact(lab, "vp1")  # we created that one: removed with our filters
        mid = foreign_packets(lab, "vp0", "ingress")
        [r2] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=10_000, down=10_000)])
        assert r2.ok and foreign_packets(lab, "vp0", "ingress") - mid >= r2.up_l3_packets
        assert progs_gone(ids)
    finally:
        reset(lab, "vp0")


def test_a_failed_attach_leaves_nothing_of_ours(small_lab: Lab) -> None:
    lab = small_lab
    foreign_filter(lab, "vp0", "egress", prio=1, kind="u32", control="continue")
    try:
        with FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tc") as fc:
            with pytest.raises(EbpfError, match="egress: priority 1 is taken"):
                fc.attach("vp0")  # ingress goes in, egress cannot: the ingress filter is rolled back
            assert fc.attachments == {}
            assert filters(lab, "vp0", "ingress") == []
            assert {x["kind"] for x in filters(lab, "vp0", "egress")} == {"u32"} and has_clsact(lab, "vp0")
    finally:
        reset(lab, "vp0")


def test_a_foreign_bpf_filter_at_our_priority_shares_it_and_runs_after_ours(small_lab: Lab) -> None:
    # same priority, same kind, another handle: cls_bpf keeps both in one list, the newest first;
    # so ours runs before theirs even though theirs ends classification ('pipe')
    lab = small_lab
    foreign_filter(lab, "vp0", "ingress", prio=1, kind="bpf", control="pipe")
    try:
        with FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tc") as fc:
            att = fc.attach("vp0")
            assert att.hooks["ingress"].preceding == [] and not att.created_clsact
            fc.attach("vp1")
            before = foreign_packets(lab, "vp0", "ingress")
            [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=80_000, down=80_000)])
            d = fc.drain()
        assert r.ok
        f = by_key(d.flows)[(r.client_ip, r.dialed_ip, r.client_port, r.dialed_port, 6)]
        assert (f.packets, f.bytes) == (r.up_l3_packets, r.up_l3_bytes)
        assert foreign_packets(lab, "vp0", "ingress") - before >= r.up_l3_packets
        left = filters(lab, "vp0", "ingress")
        assert [(x["kind"], x["options"]["handle"]) for x in left] == [("bpf", "0x1")]  # theirs only
        assert has_clsact(lab, "vp0")
    finally:
        reset(lab, "vp0")


def test_foreign_filter_that_ends_classification_first_is_reported(small_lab: Lab) -> None:
    # a filter of another kind at a lower priority that decides (mirred's default 'pipe') hides
    # packets from every later filter: cls_bpf cannot go before it (tcx could); the loader says so
    lab = small_lab
    foreign_filter(lab, "vp0", "ingress", prio=1, kind="u32", control="pipe")
    try:
        with FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tc") as fc:
            att = fc.attach("vp0", priority=2)
            assert att.hooks["ingress"].preceding[0].kind == "u32"
            [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=50_000, down=50_000)])
            d = fc.drain()
        assert r.ok
        keys = by_key(d.flows)
        assert (r.client_ip, r.dialed_ip, r.client_port, r.dialed_port, 6) not in keys  # hidden at ingress
        down = keys[(r.dialed_ip, r.client_ip, r.dialed_port, r.client_port, 6)]  # egress: still ours
        assert (down.packets, down.bytes) == (r.down_l3_packets, r.down_l3_bytes)
    finally:
        reset(lab, "vp0")


def test_a_clsact_we_created_stays_while_someone_else_uses_it(small_lab: Lab) -> None:
    lab = small_lab
    try:
        with FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tc") as fc:
            att = fc.attach("vp0")
            assert att.created_clsact
            foreign_filter(lab, "vp0", "egress", prio=100, kind="bpf", control="continue")  # after ours
            [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=20_000, down=60_000)])
            d = fc.drain()
        assert r.ok
        down = by_key(d.flows)[(r.dialed_ip, r.client_ip, r.dialed_port, r.client_port, 6)]
        assert foreign_packets(lab, "vp0", "egress") >= down.packets == r.down_l3_packets
        assert has_clsact(lab, "vp0")  # theirs is still on it
        assert [(x["kind"], x["options"]["handle"]) for x in filters(lab, "vp0", "egress")] == [
            ("bpf", "0x1")
        ]
        assert filters(lab, "vp0", "ingress") == []
    finally:
        reset(lab, "vp0")


def test_nothing_stays_attached_after_close(small_lab: Lab) -> None:
    lab = small_lab
    fc = FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tc")
    for dev in ("vp0", "vp1"):
        fc.attach(dev)
    fc.cover("cbr0")
    ids = fc.prog_ids
    assert len(ids) == 2 and all(prog_exists(i) for i in ids)
    assert len(filters(lab, "vp0", "ingress")) == 1 and len(filters(lab, "vp1", "egress")) == 1
    fc.close()
    fc.close()  # idempotent
    for dev in ("vp0", "vp1"):
        assert filters(lab, dev, "ingress") == [] and filters(lab, dev, "egress") == []
        assert not has_clsact(lab, dev)
    assert progs_gone(ids)
    with pytest.raises(EbpfError, match="closed"):
        fc.drain()


def test_an_exception_detaches(small_lab: Lab) -> None:
    lab = small_lab
    with (
        pytest.raises(RuntimeError, match="boom"),
        FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tc") as fc,
    ):
        fc.attach("vp0")
        ids = fc.prog_ids
        raise RuntimeError("boom")
    assert filters(lab, "vp0", "ingress") == [] and not has_clsact(lab, "vp0")
    assert progs_gone(ids)


AGENT = """
import json, signal, sys
from otelflow.ebpf.loader import FlowCounter, close_on_signals
fc = FlowCounter(netns=sys.argv[1], attach_mode=sys.argv[2])
assert fc.attach_mode == sys.argv[2]
fc.attach("vp0")
close_on_signals(fc)
print(json.dumps(sorted(fc.prog_ids)), flush=True)
signal.pause()
"""


def _start_agent(lab: Lab, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    p = subprocess.Popen(
        [sys.executable, "-c", AGENT, netns_path(lab, "n1"), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise AssertionError(f"agent failed: {p.communicate()[1]}")
    return p, json.loads(line)


def test_sigterm_detaches(small_lab: Lab) -> None:
    lab = small_lab
    p, ids = _start_agent(lab, "tc")
    assert len(filters(lab, "vp0", "ingress")) == 1
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == -signal.SIGTERM  # cleaned up, then died of the signal as before
    assert filters(lab, "vp0", "ingress") == [] and not has_clsact(lab, "vp0")
    assert progs_gone(ids)


def test_a_stale_filter_after_sigkill_is_replaced_at_the_next_start(small_lab: Lab) -> None:
    lab = small_lab
    p, ids = _start_agent(lab, "tc")
    p.kill()
    p.wait(timeout=20)
    try:
        # SIGKILL cannot be handled: the filter (and its program) outlive the process
        assert [x["options"]["prog"]["id"] for x in filters(lab, "vp0", "ingress")] == [ids[0]]
        with FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tc") as fc:
            fc.attach("vp0")  # replaces the stale otelflow filter instead of failing
            [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=30_000, down=30_000)])
            d = fc.drain()
            new_ids = fc.prog_ids
        f = by_key(d.flows)[(r.client_ip, r.dialed_ip, r.client_port, r.dialed_port, 6)]
        assert (f.packets, f.bytes) == (r.up_l3_packets, r.up_l3_bytes)
        assert not set(ids) & new_ids
        assert filters(lab, "vp0", "ingress") == [] and filters(lab, "vp0", "egress") == []
        assert progs_gone(ids + sorted(new_ids))
    finally:
        reset(lab, "vp0")  # the dead agent's clsact: nobody can tell who created it


# ---- tcx: first in the chain, next to a CNI's programs, nothing left behind ----------------------------
def _send_udp(lab: Lab, client: str, server: str, n: int, size: int, sport: int, dport: int) -> None:
    """n IPv4 datagrams of `size` payload bytes from a pod, fire and forget (nothing need answer)."""
    dst = lab.topology.pod_ip(server, 4)
    code = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('', {sport}))\nfor _ in range({n}): s.sendto(b'x' * {size}, ('{dst}', {dport}))"
    )
    nsu.ns_run(lab.endpoint(client).netns, [sys.executable, "-c", code])


def _at_ingress(flows: list[FlowCount], ifindex: int) -> tuple[int, int]:
    """(packets, bytes + Ethernet headers) of the IPv4 flows first counted at one interface: what a
    tc program on that ingress sees as skb->len (offloads off: no super-packets)."""
    mine = [f for f in flows if f.ifindex == ifindex and f.family == 4]
    pk = sum(f.packets for f in mine)
    return pk, sum(f.bytes for f in mine) + ETH_HLEN * pk


def test_tcx_goes_first_creates_no_qdisc_and_a_foreign_tcx_program_keeps_working(small_lab: Lab) -> None:
    lab = small_lab
    nsp = netns_path(lab, "n1")
    with foreign_tcx(nsp, "vp0", "ingress", TCX_NEXT) as theirs:  # a CNI's program, there before us
        with FlowCounter(netns=nsp, attach_mode="tcx") as fc:
            att = fc.attach("vp0")
            fc.attach("vp1")
            fc.cover("cbr0")
            assert att.backend == "tcx" and not att.created_clsact and att.hooks["ingress"].preceding == []
            assert tcx_chain(nsp, "vp0", "ingress") == [att.hooks["ingress"].prog_id, theirs.prog_id]
            assert tcx_chain(nsp, "vp0", "egress") == [att.hooks["egress"].prog_id]
            assert not has_clsact(lab, "vp0") and not has_clsact(lab, "vp1")  # no qdisc at all
            before = theirs.counts()
            [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=100_000, down=300_000)])
            d = fc.drain()
            after = theirs.counts()
            ids = fc.prog_ids
        assert r.ok, r.error
        f = by_key(d.flows)[(r.client_ip, r.dialed_ip, r.client_port, r.dialed_port, 6)]
        assert (f.packets, f.bytes) == (r.up_l3_packets, r.up_l3_bytes)
        down = by_key(d.flows)[(r.dialed_ip, r.client_ip, r.dialed_port, r.client_port, 6)]
        assert (down.packets, down.bytes) == (r.down_l3_packets, r.down_l3_bytes)
        # theirs ran after ours on every packet: exactly the IPv4 packets we counted at vp0's ingress
        assert (after[0] - before[0], after[1] - before[1]) == _at_ingress(d.flows, att.ifindex)
        # after close: ours are gone; theirs is still attached and still sees the traffic
        assert tcx_left(nsp, ["vp0", "vp1", "cbr0"]) == [f"vp0 ingress: {theirs.prog_id} foreign_cni"]
        assert progs_gone(ids)
        [r2] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=10_000, down=10_000)])
        assert r2.ok and theirs.counts()[0] - after[0] >= r2.up_l3_packets


def test_tcx_counts_the_packets_a_later_program_drops(small_lab: Lab) -> None:
    """A CNI program that drops (a network policy) runs after ours: every packet it drops was
    counted first (attached after it, ours still goes first: BPF_F_BEFORE)."""
    lab = small_lab
    nsp = netns_path(lab, "n1")
    n, size = 200, 500
    with (
        foreign_tcx(nsp, "vp0", "ingress", TCX_DROP) as theirs,
        FlowCounter(netns=nsp, attach_mode="tcx") as fc,
    ):
        att = fc.attach("vp0")
        assert tcx_chain(nsp, "vp0", "ingress") == [att.hooks["ingress"].prog_id, theirs.prog_id]
        fc.drain()
        before = theirs.counts()
        _send_udp(lab, "a", "b", n, size, 40505, 9999)
        d = fc.drain()
        after = theirs.counts()
    a_ip, b_ip = str(lab.topology.pod_ip("a", 4)), str(lab.topology.pod_ip("b", 4))
    f = by_key(d.flows)[(a_ip, b_ip, 40505, 9999, 17)]
    assert (f.packets, f.bytes) == (n, n * (size + 28))  # IPv4 + UDP headers: exact
    dropped = (after[0] - before[0], after[1] - before[1])
    assert dropped == _at_ingress(d.flows, att.ifindex)  # they dropped exactly what we had counted
    assert dropped[0] >= n


def test_tcx_runs_before_a_tc_filter_that_ends_classification(small_lab: Lab) -> None:
    # the case cls_bpf cannot help (test_foreign_filter_that_ends_classification_first_is_reported):
    # tcx programs run before every clsact filter
    lab = small_lab
    foreign_filter(lab, "vp0", "ingress", prio=1, kind="u32", control="pipe")
    try:
        with FlowCounter(netns=netns_path(lab, "n1"), attach_mode="tcx") as fc:
            fc.attach("vp0")
            fc.attach("vp1")
            before = foreign_packets(lab, "vp0", "ingress")
            [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=50_000, down=50_000)])
            d = fc.drain()
        assert r.ok, r.error
        up = by_key(d.flows)[(r.client_ip, r.dialed_ip, r.client_port, r.dialed_port, 6)]
        assert (up.packets, up.bytes) == (r.up_l3_packets, r.up_l3_bytes)
        assert foreign_packets(lab, "vp0", "ingress") - before >= r.up_l3_packets  # theirs still ran
        assert {x["kind"] for x in filters(lab, "vp0", "ingress")} == {"u32"}  # untouched
    finally:
        reset(lab, "vp0")


def test_tcx_nothing_stays_attached_after_detach_and_close(small_lab: Lab) -> None:
    lab = small_lab
    nsp = netns_path(lab, "n1")
    fc = FlowCounter(netns=nsp, attach_mode="tcx")
    for dev in ("vp0", "vp1"):
        fc.attach(dev)
    fc.cover("cbr0")
    ids = fc.prog_ids
    assert len(ids) == 2
    for dev in ("vp0", "vp1"):
        assert set(tcx_chain(nsp, dev, "ingress") + tcx_chain(nsp, dev, "egress")) == ids
    fc.detach("vp1")
    assert tcx_left(nsp, ["vp1"]) == []
    fc.close()
    fc.close()  # idempotent
    assert tcx_left(nsp, ["vp0", "vp1", "cbr0"]) == []
    assert not has_clsact(lab, "vp0") and not has_clsact(lab, "vp1")
    assert progs_gone(ids)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_tcx_leaves_nothing_after_a_signal_even_sigkill(small_lab: Lab, sig: int) -> None:
    lab = small_lab
    nsp = netns_path(lab, "n1")
    with foreign_tcx(nsp, "vp0", "egress", TCX_NEXT) as theirs:
        p, ids = _start_agent(lab, "tcx")
        assert tcx_chain(nsp, "vp0", "egress")[1:] == [theirs.prog_id]
        assert tcx_chain(nsp, "vp0", "egress")[0] in ids and tcx_chain(nsp, "vp0", "ingress")[0] in ids
        p.send_signal(sig)
        assert p.wait(timeout=20) == -sig
        # SIGKILL too: the kernel closed the dead process's link fds, which detached the links
        assert tcx_chain(nsp, "vp0", "egress") == [theirs.prog_id]
        assert tcx_chain(nsp, "vp0", "ingress") == []
        assert not has_clsact(lab, "vp0")
        assert progs_gone(ids)
