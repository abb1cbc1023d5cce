"""Declarative description of a netlab cluster and its address plan (pure: no root, no kernel).

A topology names nodes, pods, Services and external hosts. Everything else (addresses, interface
names, routes, nftables rule sets) is derived from it deterministically, so tests and the demo can
predict every address without asking the kernel.

Address plan (IPv4 / IPv6, both always assigned when ``ipv6`` is on):

==================  =======================  ==========================
what                IPv4                     IPv6
==================  =======================  ==========================
node network        10.100.0.0/24            fd00:100::/64
  router (fabric)   10.100.0.1               fd00:100::1
  node i (1-based)  10.100.0.(10+i)          fd00:100::(10+i)
pod CIDR of node i  10.244.i.0/24            fd00:244:0:i::/64
  node bridge       10.244.i.1               fd00:244:0:i::1
  pods              10.244.i.(2+k)           fd00:244:0:i::(2+k)
Service CIDR        10.96.0.0/16             fd00:96::/112
  Service j         10.96.0.(10+j)           fd00:96::(10+j)
external network    203.0.113.0/24           2001:db8:113::/64
  router            203.0.113.1              2001:db8:113::1
  external host j   203.0.113.(10+j)         2001:db8:113::(10+j)
==================  =======================  ==========================

IPv6 host parts repeat the IPv4 digits (10.244.1.12 <-> fd00:244:0:1::12). Up to 99 nodes (the
node index appears in both families' pod CIDRs). The external network uses documentation ranges
(RFC 5737 / RFC 3849): they exist only inside the lab's namespaces and never lead anywhere else.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

POD_CIDR_V4 = ipaddress.ip_network("10.244.0.0/16")
POD_CIDR_V6 = ipaddress.ip_network("fd00:244::/48")
NODE_NET_V4 = ipaddress.ip_network("10.100.0.0/24")
NODE_NET_V6 = ipaddress.ip_network("fd00:100::/64")
SERVICE_CIDR_V4 = ipaddress.ip_network("10.96.0.0/16")
SERVICE_CIDR_V6 = ipaddress.ip_network("fd00:96::/112")
EXTERNAL_NET_V4 = ipaddress.ip_network("203.0.113.0/24")
EXTERNAL_NET_V6 = ipaddress.ip_network("2001:db8:113::/64")
MASQ_MARK = 0x4000  # kube-proxy's KUBE-MARK-MASQ bit

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")


class TopologyError(ValueError):
    """A topology description that cannot be built; the message names the offending entry."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    zone: str = ""
    region: str = ""


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str
    node: str
    namespace: str = "default"
    workload: str = ""  # owning workload name (Deployment, StatefulSet, ...)
    workload_kind: str = ""
    host_network: bool = False


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    port: int
    target_port: int
    backends: tuple[str, ...]  # pod names
    namespace: str = "default"
    protocol: Literal["tcp", "udp"] = "tcp"


@dataclass(frozen=True, slots=True)
class ExternalSpec:
    name: str


@dataclass(frozen=True, slots=True)
class Topology:
    nodes: tuple[NodeSpec, ...]
    pods: tuple[PodSpec, ...] = ()
    services: tuple[ServiceSpec, ...] = ()
    externals: tuple[ExternalSpec, ...] = ()
    ipv6: bool = True
    # False: TSO/GSO/GRO off and gso_max_segs 1 on every lab interface, so every observation point
    # (sender, node, receiver) sees the same wire-sized packets. True: kernel defaults (super-packets).
    offloads: bool = False
    conntrack_udp_timeout: int = 120  # seconds; the kernel default (30 s) expires entries mid-test

    def __post_init__(self) -> None:
        _validate(self)

    # ---- lookups -------------------------------------------------------------------------
    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def pod(self, name: str) -> PodSpec:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def service(self, name: str) -> ServiceSpec:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def node_index(self, name: str) -> int:
        """1-based index of a node: it fixes the node's addresses and pod CIDR."""
        for i, n in enumerate(self.nodes, 1):
            if n.name == name:
                return i
        raise KeyError(name)

    def pods_on(self, node: str) -> list[PodSpec]:
        return [p for p in self.pods if p.node == node and not p.host_network]

    # ---- address plan --------------------------------------------------------------------
    def node_ip(self, node: str, family: int = 4) -> IPAddress:
        i = self.node_index(node)
        return _host(NODE_NET_V4 if family == 4 else NODE_NET_V6, 10 + i)

    def router_ip(self, family: int = 4) -> IPAddress:
        return _host(NODE_NET_V4 if family == 4 else NODE_NET_V6, 1)

    def pod_cidr(self, node: str, family: int = 4) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        i = self.node_index(node)
        if family == 4:
            return ipaddress.ip_network(f"10.244.{i}.0/24")
        return ipaddress.ip_network(f"fd00:244:0:{i}::/64")

    def bridge_ip(self, node: str, family: int = 4) -> IPAddress:
        return _host(self.pod_cidr(node, family), 1)

    def pod_ip(self, pod: str, family: int = 4) -> IPAddress:
        p = self.pod(pod)
        if p.host_network:
            return self.node_ip(p.node, family)
        k = [q.name for q in self.pods_on(p.node)].index(pod)
        return _host(self.pod_cidr(p.node, family), 2 + k)

    def service_ip(self, service: str, family: int = 4) -> IPAddress:
        j = [s.name for s in self.services].index(service)
        return _host(SERVICE_CIDR_V4 if family == 4 else SERVICE_CIDR_V6, 10 + j)

    def external_ip(self, name: str, family: int = 4) -> IPAddress:
        j = [e.name for e in self.externals].index(name)
        return _host(EXTERNAL_NET_V4 if family == 4 else EXTERNAL_NET_V6, 10 + j)

    def external_router_ip(self, family: int = 4) -> IPAddress:
        return _host(EXTERNAL_NET_V4 if family == 4 else EXTERNAL_NET_V6, 1)

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)


def _host(net: ipaddress.IPv4Network | ipaddress.IPv6Network, n: int) -> IPAddress:
    """Host n of a network. IPv6 host parts reuse the decimal digits of the IPv4 one (10.244.1.12 <->
    fd00:244:0:1::12) so that the two families read alike."""
    return net[n] if net.version == 4 else net[int(str(n), 16)]


def _validate(t: Topology) -> None:
    if not t.nodes:
        raise TopologyError("topology: at least one node is required")
    if len(t.nodes) > 99:
        raise TopologyError("topology: at most 99 nodes")
    seen: set[str] = set()
    for kind, names in (
        ("node", [n.name for n in t.nodes]),
        ("pod", [p.name for p in t.pods]),
        ("external", [e.name for e in t.externals]),
    ):
        for name in names:
            if not _NAME_RE.match(name):
                raise TopologyError(f"topology: {kind} name {name!r}: use 1-32 of [a-z0-9-], no edge dashes")
            if name in seen:
                raise TopologyError(
                    f"topology: name {name!r} is used twice (node, pod and external names share one space)"
                )
            seen.add(name)
    node_names = {n.name for n in t.nodes}
    for p in t.pods:
        if p.node not in node_names:
            raise TopologyError(f"topology: pod {p.name!r}: unknown node {p.node!r}")
    for n in t.nodes:
        if len(t.pods_on(n.name)) > 250:
            raise TopologyError(f"topology: node {n.name!r}: at most 250 pods per node")
    svc_names: set[str] = set()
    pods = {p.name: p for p in t.pods}
    for s in t.services:
        if s.name in svc_names:
            raise TopologyError(f"topology: service {s.name!r} is defined twice")
        svc_names.add(s.name)
        for port_name, port in (("port", s.port), ("target_port", s.target_port)):
            if not 1 <= port <= 65535:
                raise TopologyError(f"topology: service {s.name!r}: {port_name} {port} is not in 1..65535")
        if not s.backends:
            raise TopologyError(f"topology: service {s.name!r}: needs at least one backend pod")
        for b in s.backends:
            if b not in pods:
                raise TopologyError(f"topology: service {s.name!r}: unknown backend pod {b!r}")
            if pods[b].host_network:
                raise TopologyError(
                    f"topology: service {s.name!r}: backend {b!r} is host-network (unsupported)"
                )
    if len(t.services) > 200:
        raise TopologyError("topology: at most 200 services")
    if len(t.externals) > 200:
        raise TopologyError("topology: at most 200 external hosts")


# ---- loading from plain data (YAML) ------------------------------------------------------------
_FIELDS: dict[type, set[str]] = {
    NodeSpec: {"name", "zone", "region"},
    PodSpec: {"name", "node", "namespace", "workload", "workload_kind", "host_network"},
    ServiceSpec: {"name", "port", "target_port", "backends", "namespace", "protocol"},
    ExternalSpec: {"name"},
}
_TOP_KEYS = {"nodes", "pods", "services", "externals", "ipv6", "offloads", "conntrack_udp_timeout"}


def _build(cls: type, where: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise TopologyError(f"topology: {where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _FIELDS[cls]
    if unknown:
        raise TopologyError(f"topology: {where}: unknown key {sorted(unknown)[0]!r}")
    data = dict(raw)
    if cls is ServiceSpec:
        data.setdefault("target_port", data.get("port"))
        b = data.get("backends", ())
        if not isinstance(b, list | tuple) or not all(isinstance(x, str) for x in b):
            raise TopologyError(f"topology: {where}.backends: expected a list of pod names")
        data["backends"] = tuple(b)
        if data.get("protocol", "tcp") not in ("tcp", "udp"):
            raise TopologyError(f"topology: {where}.protocol: expected 'tcp' or 'udp'")
    try:
        return cls(**data)
    except TypeError as e:
        raise TopologyError(f"topology: {where}: {e}") from None


def topology_from_dict(raw: Any) -> Topology:
    """Build a Topology from plain data (a parsed YAML document); errors name the entry."""
    if not isinstance(raw, dict):
        raise TopologyError("topology: expected a mapping at the top level")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise TopologyError(f"topology: unknown key {sorted(unknown)[0]!r}")

    def items(key: str, cls: type) -> tuple[Any, ...]:
        v = raw.get(key) or []
        if not isinstance(v, list):
            raise TopologyError(f"topology: {key}: expected a list")
        return tuple(_build(cls, f"{key}[{i}]", x) for i, x in enumerate(v))

    flags: dict[str, Any] = {}
    for k, typ in (("ipv6", bool), ("offloads", bool), ("conntrack_udp_timeout", int)):
        if k in raw:
            if type(raw[k]) is not typ:
                raise TopologyError(f"topology: {k}: expected {typ.__name__}")
            flags[k] = raw[k]
    return Topology(
        nodes=items("nodes", NodeSpec),
        pods=items("pods", PodSpec),
        services=items("services", ServiceSpec),
        externals=items("externals", ExternalSpec),
        **flags,
    )


def demo_topology() -> Topology:
    """Two nodes in two zones, a small shop application, a Service, and an external host."""
    return Topology(
        nodes=(
            NodeSpec("node-a", zone="zone-a", region="lab"),
            NodeSpec("node-b", zone="zone-b", region="lab"),
        ),
        pods=(
            PodSpec("frontend-0", "node-a", "shop", "frontend", "Deployment"),
            PodSpec("frontend-1", "node-b", "shop", "frontend", "Deployment"),
            PodSpec("cart-0", "node-a", "shop", "cart", "Deployment"),
            PodSpec("payments-0", "node-b", "shop", "payments", "Deployment"),
            PodSpec("payments-1", "node-a", "shop", "payments", "Deployment"),
            PodSpec("db-0", "node-b", "data", "db", "StatefulSet"),
            PodSpec(
                "node-exporter-a", "node-a", "monitoring", "node-exporter", "DaemonSet", host_network=True
            ),
        ),
        services=(
            ServiceSpec("payments", 80, 8080, ("payments-0", "payments-1"), "shop"),
            ServiceSpec("db", 5432, 5432, ("db-0",), "data"),
            ServiceSpec("dns", 53, 5353, ("cart-0",), "shop", protocol="udp"),
        ),
        externals=(ExternalSpec("internet"),),
    )


# ---- names in the kernel -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Names:
    """Network-namespace and interface names of one lab instance (unique prefix per lab)."""

    lab_id: str
    prefix: str = field(init=False)

    PREFIX = "ofl-"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]{4,12}", self.lab_id):
            raise TopologyError(f"lab id {self.lab_id!r}: use 4-12 of [a-z0-9]")
        object.__setattr__(self, "prefix", f"{self.PREFIX}{self.lab_id}-")

    def router(self) -> str:
        return f"{self.prefix}fabric"

    def node(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def pod(self, pod: str) -> str:
        return f"{self.prefix}pod-{pod}"

    def external(self, name: str) -> str:
        return f"{self.prefix}ext-{name}"
