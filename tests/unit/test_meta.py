"""IP index (history, host-network ports, classes), the static inventory, count-once rules."""

from __future__ import annotations

import pytest

from otelflow.countonce import CountOnce, owner
from otelflow.decorate import Decorator
from otelflow.flow import FlowDelta
from otelflow.meta.index import CidrGroups, IpIndex, classify
from otelflow.meta.inventory import InventoryError, build_index, load_inventory
from otelflow.meta.model import NodeMeta, Peer, PodMeta, ServiceMeta, ServicePort

N1 = NodeMeta("n1", ("10.0.0.1",), zone="a", region="r")
N2 = NodeMeta("n2", ("10.0.0.2",), zone="b", region="r")


def index(clock: list[float] | None = None) -> IpIndex:
    t = clock if clock is not None else [1000.0]
    idx = IpIndex(
        CidrGroups([("corp", "192.168.0.0/16"), ("corp-dc", "192.168.10.0/24")]),
        history=60,
        clock=lambda: t[0],
    )
    idx.upsert_node(N1)
    idx.upsert_node(N2)
    return idx


def test_pod_node_service_resolution() -> None:
    idx = index()
    idx.upsert_pod(PodMeta("shop", "web-0", "n1", ("10.1.1.2", "fd00::2"), "uid1", "web", "Deployment"))
    idx.upsert_service(ServiceMeta("shop", "web", ("10.96.0.10",), (ServicePort(80, 8080),), ("shop/web-0",)))
    p = idx.resolve("fd00::2")
    assert (p.kind, p.namespace, p.name, p.node, p.zone, p.workload_name, p.uid) == (
        "pod",
        "shop",
        "web-0",
        "n1",
        "a",
        "web",
        "uid1",
    )
    assert idx.resolve("10.0.0.2").kind == "node" and idx.resolve("10.0.0.2").zone == "b"
    assert idx.resolve("10.96.0.10").kind == "service"
    assert idx.service_of("10.96.0.10", 80, "tcp").name == "web"  # type: ignore[union-attr]
    assert idx.service_of("10.96.0.10", 81, "tcp") is None
    assert idx.service_for_backend("shop", "web-0", 8080, "tcp").name == "web"  # type: ignore[union-attr]
    assert idx.service_for_backend("shop", "web-0", 9999, "tcp") is None


@pytest.mark.parametrize(
    ("addr", "cls"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("224.0.0.22", "multicast"),
        ("ff02::16", "multicast"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("10.9.9.9", "private"),
        ("100.64.0.1", "private"),
        ("fd12::1", "private"),
        ("8.8.8.8", "public"),
        ("2606:4700::1", "public"),
        ("192.168.1.1", "corp"),
        ("192.168.10.5", "corp-dc"),  # longest prefix wins
        ("::ffff:8.8.8.8", "public"),
    ],
)
def test_unknown_addresses_are_classified_never_named(addr: str, cls: str) -> None:
    idx = index()
    p = idx.resolve(addr)
    assert p.kind == "external" and p.peer_class == cls and p.name == ""
    assert classify(addr, idx.groups) == cls


def test_deleted_pod_is_still_named_and_a_reused_ip_goes_by_time() -> None:
    clock = [1000.0]
    idx = index(clock)
    idx.upsert_pod(PodMeta("a", "old", "n1", ("10.1.1.9",)))
    clock[0] = 1010.0
    idx.delete_pod("a", "old")
    assert idx.resolve("10.1.1.9").name == "old"  # deleted a moment ago: still named
    clock[0] = 1020.0
    idx.upsert_pod(PodMeta("a", "new", "n2", ("10.1.1.9",)))
    assert idx.resolve("10.1.1.9").name == "new"
    assert idx.resolve("10.1.1.9", at=1005.0).name == "old"  # a flow that started before: the old pod
    clock[0] = 1100.0
    assert idx.prune() == 1
    assert idx.resolve("10.1.1.9", at=1005.0).name == "new"


def test_recreated_pod_with_a_new_ip() -> None:
    clock = [0.0]
    idx = index(clock)
    idx.upsert_pod(PodMeta("a", "web", "n1", ("10.1.1.2",)))
    idx.upsert_pod(PodMeta("a", "web", "n2", ("10.1.2.7",)))  # same name, new IP
    assert idx.resolve("10.1.2.7").node == "n2"
    assert idx.resolve("10.1.1.2").name == "web"  # the old address, within history
    clock[0] = 100.0
    idx.prune()
    assert idx.resolve("10.1.1.2").kind == "external"


def test_history_expires() -> None:
    clock = [0.0]
    idx = index(clock)
    idx.upsert_pod(PodMeta("a", "p", "n1", ("10.1.1.3",)))
    idx.delete_pod("a", "p")
    clock[0] = 61.0
    assert idx.resolve("10.1.1.3").kind == "external"


def test_host_network_pod_is_the_node_unless_its_port_says_otherwise() -> None:
    idx = index()
    idx.upsert_pod(PodMeta("mon", "exporter", "n1", (), host_network=True, host_ports=(9100,)))
    assert idx.resolve("10.0.0.1", 9100).name == "exporter"
    assert idx.resolve("10.0.0.1", 9100).kind == "pod"
    assert idx.resolve("10.0.0.1", 22).kind == "node"
    assert idx.resolve("10.0.0.1").kind == "node"
    idx.delete_pod("mon", "exporter")
    assert idx.resolve("10.0.0.1", 9100).name == "exporter"  # history applies here too


def pod(node: str) -> Peer:
    return Peer("pod", "pod", node=node, name="p")


EXT = Peer("external", "public")


@pytest.mark.parametrize(
    ("sender", "receiver", "observer", "want"),
    [
        (pod("n1"), pod("n2"), "n2", "n1"),  # the sending pod's node
        (pod("n2"), pod("n1"), "n1", "n2"),
        (EXT, pod("n2"), "n2", "n2"),  # sender outside: the receiving pod's node
        (pod("n1"), EXT, "n1", "n1"),
        (Peer("node", "node", node="n1"), pod("n2"), "n2", "n1"),  # host network = its node
        (EXT, Peer("external", "private"), "n3", "n3"),  # transit: where it was seen
    ],
)
def test_owner(sender: Peer, receiver: Peer, observer: str, want: str) -> None:
    assert owner(sender, receiver, observer) == want


def flow(**kw: object) -> FlowDelta:
    base = dict(
        flow_id="1", source="conntrack", observer="n1", family=4, transport="tcp",
        client_ip="10.1.1.2", client_port=40000, dialed_ip="10.96.0.10", dialed_port=80,
        server_ip="10.1.2.3", server_port=8080, client_nat_ip="10.1.1.2", client_nat_port=40000,
        dnat=True, snat=False, bytes_c2s=1, packets_c2s=1, bytes_s2c=1, packets_s2c=1,
        opened=True, closed=False, state="ESTABLISHED", first_seen=1000.0, last_seen=1000.0,
    )  # fmt: skip
    base.update(kw)
    return FlowDelta(**base)  # type: ignore[arg-type]


def test_each_direction_is_owned_by_exactly_one_node() -> None:
    idx = index()
    idx.upsert_pod(PodMeta("shop", "fe", "n1", ("10.1.1.2",)))
    idx.upsert_pod(PodMeta("shop", "be", "n2", ("10.1.2.3",)))
    idx.upsert_service(ServiceMeta("shop", "be", ("10.96.0.10",), (ServicePort(80, 8080),), ("shop/be",)))
    on_n1 = Decorator(idx, CountOnce("n1")).decorate(flow(observer="n1"))
    on_n2 = Decorator(idx, CountOnce("n2")).decorate(
        flow(observer="n2", dialed_ip="10.1.2.3", dialed_port=8080, dnat=False)
    )
    assert (on_n1.count_c2s, on_n1.count_s2c) == (True, False)
    assert (on_n2.count_c2s, on_n2.count_s2c) == (False, True)
    assert on_n1.service and on_n2.service and on_n1.service.name == on_n2.service.name == "be"
    assert on_n1.count_conn and not on_n2.count_conn


def test_snat_on_this_node_decides_as_the_next_node_sees_it() -> None:
    """NodePort-style: external client DNATed to a pod on n2 and SNATed to n1's address. n2 sees n1
    as the client; n1 must agree and own client->server, or nobody would count it."""
    idx = index()
    idx.upsert_pod(PodMeta("shop", "be", "n2", ("10.1.2.3",)))
    ext = dict(client_ip="8.8.4.4", dialed_ip="10.0.0.1", dialed_port=30080)
    on_n1 = Decorator(idx, CountOnce("n1")).decorate(
        flow(observer="n1", snat=True, client_nat_ip="10.0.0.1", **ext)
    )
    on_n2 = Decorator(idx, CountOnce("n2")).decorate(
        flow(observer="n2", client_ip="10.0.0.1", dialed_ip="10.1.2.3", dialed_port=8080, dnat=False)
    )
    assert on_n1.client.peer_class == "public"  # the name stays the real client
    assert (on_n1.count_c2s, on_n2.count_c2s) == (True, False)
    assert (on_n1.count_s2c, on_n2.count_s2c) == (False, True)


def test_inventory_round_trip_and_errors() -> None:
    data = {
        "nodes": [{"name": "n1", "ips": ["10.0.0.1"], "zone": "a"}],
        "pods": [{"namespace": "s", "name": "p", "node": "n1", "ips": ["10.1.1.2"], "workload": "w"}],
        "services": [
            {
                "namespace": "s",
                "name": "svc",
                "ips": ["10.96.0.1"],
                "ports": [{"port": 80}],
                "backends": ["s/p"],
            }
        ],
        "hosts": [{"name": "billing", "ips": ["192.0.2.7"], "namespace": "legacy"}],
        "networks": [{"name": "office", "cidrs": ["198.51.100.0/24"]}],
    }
    records, groups = load_inventory(data)
    idx = build_index(records, groups)
    assert idx.resolve("10.1.1.2").workload_name == "w"
    assert idx.resolve("192.0.2.7").kind == "host" and idx.resolve("192.0.2.7").namespace == "legacy"
    assert idx.resolve("198.51.100.9").peer_class == "office"
    assert idx.service_of("10.96.0.1", 80, "tcp") is not None
    for bad, needle in [
        ({"podz": []}, "unknown section 'podz'"),
        ({"nodes": [{"name": "n", "ips": ["nope"]}]}, "'nope' is not an IP address"),
        ({"nodes": [{"ips": ["10.0.0.1"]}]}, "nodes[0].name: required"),
        ({"pods": [{"name": "p", "ips": ["10.0.0.9"]}]}, "pods[0].node: required"),
        ({"networks": [{"name": "x", "cidrs": ["10.0.0.0/99"]}]}, "not a CIDR"),
        ({"hosts": [{"name": "h", "ips": ["10.0.0.1"], "colour": "red"}]}, "unknown key 'colour'"),
    ]:
        with pytest.raises(InventoryError, match=None) as e:
            load_inventory(bad)
        assert needle in str(e.value) and "\n" not in str(e.value)
