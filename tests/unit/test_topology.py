"""Topology description, address plan and rendered rule sets (pure Python)."""

from __future__ import annotations

import ipaddress

import pytest

from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import (
    Names,
    NodeSpec,
    PodSpec,
    ServiceSpec,
    Topology,
    TopologyError,
    demo_topology,
    topology_from_dict,
)

YAML_LIKE = {
    "nodes": [{"name": "n1", "zone": "a"}, {"name": "n2", "zone": "b"}],
    "pods": [
        {"name": "web", "node": "n1", "namespace": "shop", "workload": "web", "workload_kind": "Deployment"},
        {"name": "db", "node": "n2"},
        {"name": "agent", "node": "n2", "host_network": True},
    ],
    "services": [{"name": "db", "port": 5432, "backends": ["db"]}],
    "externals": [{"name": "internet"}],
}


def test_from_dict_builds_everything() -> None:
    t = topology_from_dict(YAML_LIKE)
    assert [n.name for n in t.nodes] == ["n1", "n2"]
    assert t.pod("web").namespace == "shop"
    assert t.service("db").target_port == 5432  # defaults to port
    assert t.ipv6 and not t.offloads


def test_address_plan_is_deterministic_and_family_aligned() -> None:
    t = topology_from_dict(YAML_LIKE)
    assert t.node_ip("n1") == ipaddress.ip_address("10.100.0.11")
    assert t.node_ip("n2", 6) == ipaddress.ip_address("fd00:100::12")
    assert t.pod_cidr("n2") == ipaddress.ip_network("10.244.2.0/24")
    assert t.pod_cidr("n2", 6) == ipaddress.ip_network("fd00:244:0:2::/64")
    assert t.pod_ip("web") == ipaddress.ip_address("10.244.1.2")
    assert t.pod_ip("web", 6) == ipaddress.ip_address("fd00:244:0:1::2")
    assert t.pod_ip("db") == ipaddress.ip_address("10.244.2.2")
    # host-network pods share their node's addresses
    assert t.pod_ip("agent") == t.node_ip("n2")
    assert t.service_ip("db") == ipaddress.ip_address("10.96.0.10")
    assert t.service_ip("db", 6) == ipaddress.ip_address("fd00:96::10")
    assert t.external_ip("internet") == ipaddress.ip_address("203.0.113.10")
    assert t.external_ip("internet", 6) == ipaddress.ip_address("2001:db8:113::10")


def test_every_address_is_unique_and_inside_the_lab_ranges() -> None:
    t = demo_topology()
    seen: set[object] = set()
    for fam in (4, 6):
        addrs = [t.node_ip(n.name, fam) for n in t.nodes]
        addrs += [t.pod_ip(p.name, fam) for p in t.pods if not p.host_network]
        addrs += [t.service_ip(s.name, fam) for s in t.services]
        addrs += [t.external_ip(e.name, fam) for e in t.externals]
        for a in addrs:
            assert a not in seen
            seen.add(a)
            assert a.is_private or a in ipaddress.ip_network("203.0.113.0/24")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(nodes=[]), "at least one node"),
        (lambda d: d["pods"].append({"name": "x", "node": "nope"}), "unknown node 'nope'"),
        (lambda d: d["pods"].append({"name": "web", "node": "n1"}), "used twice"),
        (lambda d: d["pods"].append({"name": "Bad_Name", "node": "n1"}), "Bad_Name"),
        (lambda d: d["services"].append({"name": "s", "port": 0, "backends": ["db"]}), "port 0"),
        (lambda d: d["services"].append({"name": "s", "port": 80, "backends": ["ghost"]}), "ghost"),
        (lambda d: d["services"].append({"name": "s", "port": 80, "backends": []}), "at least one backend"),
        (lambda d: d["services"].append({"name": "s", "port": 80, "backends": ["agent"]}), "host-network"),
        (
            lambda d: d["services"].append({"name": "s", "port": 80, "backends": ["db"], "protocol": "sctp"}),
            "protocol",
        ),
        (lambda d: d.update(colour="blue"), "unknown key 'colour'"),
        (lambda d: d["nodes"].append({"name": "n3", "zonee": "c"}), "unknown key 'zonee'"),
        (lambda d: d.update(ipv6="yes"), "ipv6: expected bool"),
        (lambda d: d.update(pods="web"), "pods: expected a list"),
    ],
)
def test_bad_topologies_name_the_problem(mutate: object, needle: str) -> None:
    import copy

    d = copy.deepcopy(YAML_LIKE)
    mutate(d)  # type: ignore[operator]
    with pytest.raises(TopologyError) as e:
        topology_from_dict(d)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_names_have_a_unique_prefix_per_lab() -> None:
    a, b = Names("abc123"), Names("def456")
    assert a.node("n1") != b.node("n1")
    assert a.pod("web").startswith("ofl-abc123-")
    with pytest.raises(TopologyError):
        Names("UPPER")


def test_node_ruleset_implements_services_like_kube_proxy() -> None:
    t = Topology(
        nodes=(NodeSpec("n1"),),
        pods=(PodSpec("a", "n1"), PodSpec("b", "n1")),
        services=(ServiceSpec("svc", 80, 8080, ("a", "b"), "ns1"),),
    )
    rs = Lab(t, "unit01").node_ruleset("n1")
    # dispatch on ClusterIP and port, both families
    assert "ip daddr 10.96.0.10 tcp dport 80 jump svc_ns1_svc_v4" in rs
    assert "ip6 daddr fd00:96::10 tcp dport 80 jump svc_ns1_svc_v6" in rs
    # random choice among endpoints, DNAT to the target port, hairpin marked for masquerade
    assert "numgen random mod 2 vmap { 0 : jump sep_ns1_svc_v4_0, 1 : jump sep_ns1_svc_v4_1 }" in rs
    assert "meta l4proto tcp dnat ip to 10.244.1.3:8080" in rs
    assert "meta l4proto tcp dnat ip6 to [fd00:244:0:1::2]:8080" in rs
    assert "ip saddr 10.244.1.2 meta mark set mark | 0x4000" in rs
    # conntrack is in use (so the node tracks), egress is masqueraded
    assert "ct state established,related" in rs
    assert 'oifname "eth0" ip saddr 10.244.0.0/16' in rs and "masquerade" in rs


def test_ipv4_only_topology_renders_no_ipv6() -> None:
    t = Topology(
        nodes=(NodeSpec("n1"),),
        pods=(PodSpec("a", "n1"),),
        services=(ServiceSpec("s", 1, 1, ("a",)),),
        ipv6=False,
    )
    rs = Lab(t, "unit02").node_ruleset("n1")
    assert "ip6" not in rs
