"""Joining the TC counter's one-way counts into flows (otelflow.ebpf.join), without a kernel."""

from __future__ import annotations

import socket
from ipaddress import ip_address

from otelflow.conntrack.netlink import IPS_DST_NAT, CtEntry, CtTuple
from otelflow.ebpf.join import ACK, C2S, FIN, RST, S2C, SYN, ConntrackIndex, Count, LoneFlows, id_source


def a(ip: str) -> bytes:
    return ip_address(ip).packed


def tup(src: str, dst: str, sport: int, dport: int, proto: int = 6) -> CtTuple:
    return CtTuple(a(src), a(dst), proto, sport, dport)


def count(src: str, dst: str, sport: int, dport: int, nbytes: int, flags: int = 0, t: float = 100.0) -> Count:
    return Count((6, a(src), a(dst), sport, dport), 4, nbytes // 100, nbytes, t, t + 0.5, flags)


# pod 10.0.0.2:40000 dials ClusterIP 10.96.0.10:80, DNAT to backend 10.0.1.5:8080
SVC = CtEntry(
    socket.AF_INET,
    tup("10.0.0.2", "10.96.0.10", 40000, 80),
    tup("10.0.1.5", "10.0.0.2", 8080, 40000),
    id=7,
    status=IPS_DST_NAT,
)


def test_a_service_conversation_is_one_flow_from_every_view() -> None:
    ix = ConntrackIndex()
    ix.started("f1", SVC, 1.0)
    k = count("10.0.0.2", "10.96.0.10", 40000, 80, 0).key  # client's veth ingress, before DNAT
    assert ix.lookup(k) == ("f1", C2S)
    assert ix.lookup(count("10.0.1.5", "10.0.0.2", 8080, 40000, 0).key) == ("f1", S2C)  # backend's veth
    # a local (host-network) client's packets at egress, after NAT
    assert ix.lookup(count("10.0.0.2", "10.0.1.5", 40000, 8080, 0).key) == ("f1", C2S)
    assert ix.lookup(count("10.96.0.10", "10.0.0.2", 80, 40000, 0).key) == ("f1", S2C)
    assert ix.lookup(count("10.0.0.2", "10.96.0.10", 40001, 80, 0).key) is None


def test_ended_flows_keep_their_keys_for_the_grace_polls_and_reuse_prefers_the_newest() -> None:
    ix = ConntrackIndex(grace_polls=2)
    key = count("10.0.0.2", "10.96.0.10", 40000, 80, 0).key
    ix.started("f1", SVC, 1.0)
    ix.ended("f1", SVC)
    ix.end_poll()
    assert ix.lookup(key) == ("f1", C2S)  # late packets still find it
    ix.started("f2", SVC, 2.0)  # the same tuple again: a new conntrack instance
    assert ix.lookup(key) == ("f2", C2S)
    ix.end_poll()  # f1's grace is over: its keys go, but not f2's
    assert ix.lookup(key) == ("f2", C2S) and "f1" not in ix.flows and len(ix) == 1


def lone() -> LoneFlows:
    return LoneFlows("n1", idle_timeout=30.0, ids=id_source("e"), inet_ntop=socket.inet_ntop)


def test_lone_tcp_flow_client_from_syn_and_exact_sums() -> None:
    lf = lone()
    # server -> client arrives first in the list, but the client is the one that sent SYN
    lf.add(
        [
            count("10.0.0.9", "10.0.0.2", 5000, 60000, 700, SYN | ACK, t=100.1),
            count("10.0.0.2", "10.0.0.9", 60000, 5000, 300, SYN | ACK, t=100.0),
        ]
    )
    [d] = lf.collect(101.0)
    assert (d.client_ip, d.client_port, d.server_ip, d.server_port) == ("10.0.0.2", 60000, "10.0.0.9", 5000)
    assert (d.bytes_c2s, d.packets_c2s, d.bytes_s2c, d.packets_s2c) == (300, 3, 700, 7)
    assert d.opened and not d.closed and d.state == "ESTABLISHED" and d.source == "ebpf"
    lf.add([count("10.0.0.9", "10.0.0.2", 5000, 60000, 200, FIN | ACK)])
    lf.add([count("10.0.0.2", "10.0.0.9", 60000, 5000, 100, FIN | ACK)])
    [d2] = lf.collect(102.0)
    assert d2.flow_id == d.flow_id and (d2.bytes_c2s, d2.bytes_s2c) == (100, 200)
    assert d2.closed and not d2.opened and d2.state == "CLOSE"
    lf.add([count("10.0.0.2", "10.0.0.9", 60000, 5000, 100, ACK)])  # the last ACK, after close
    [d3] = lf.collect(103.0)
    assert d3.flow_id == d.flow_id and not d3.closed and d3.bytes_c2s == 100
    lf.add([count("10.0.0.2", "10.0.0.9", 60000, 5000, 100, SYN)])  # the tuple reused: a new flow
    [d4] = lf.collect(104.0)
    assert d4.flow_id != d.flow_id and d4.opened


def test_lone_client_from_ephemeral_port_then_first_heard() -> None:
    lf = lone()
    lf.add([count("10.0.0.9", "10.0.0.2", 443, 51000, 500)])  # only the answer seen, mid-flow
    [d] = lf.collect(101.0)
    assert (d.client_port, d.server_port, d.bytes_c2s, d.bytes_s2c) == (51000, 443, 0, 500)
    assert not d.opened  # no SYN: it was running before the agent
    lf2 = lone()
    lf2.add(
        [
            count("10.0.0.2", "10.0.0.9", 40000, 41000, 100, t=100.2),
            count("10.0.0.9", "10.0.0.2", 41000, 40000, 100, t=100.1),
        ]
    )
    [d2] = lf2.collect(101.0)
    assert d2.client_port == 41000  # both ephemeral: the side heard first is the client


def test_lone_flow_closes_on_rst_and_on_idle_timeout() -> None:
    lf = lone()
    lf.add([count("10.0.0.2", "10.0.0.9", 60000, 80, 100, RST)])
    [d] = lf.collect(101.0)
    assert d.closed
    lf.add([count("10.0.0.2", "10.0.0.9", 60001, 80, 100, ACK, t=100.0)])
    assert [x.closed for x in lf.collect(101.0)] == [False]
    [d2] = lf.collect(100.5 + 30.0)  # 30 s after its last packet
    assert d2.closed and d2.bytes_c2s == 0
    assert lf.collect(200.0) == [] and len(lf) == 0
