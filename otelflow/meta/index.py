"""The IP index: address (and port, for host-network pods) -> who it is, with history.

* Pod IPs (both families), node IPs, Service IPs (ClusterIPs, LoadBalancer ingress, external IPs) and
  inventory hosts are indexed by their text address.
* **History**: when an address is released (pod deleted, IP handed to another pod), the old owner
  stays resolvable for ``history`` seconds, and a lookup made with the flow's own time picks the
  owner that held the address at that time. A flow from a pod deleted a moment ago is still named.
* **Host-network pods** share their node's IP. Such an address resolves to the node, unless the port
  identifies a host-network pod on that node (one of its declared host ports): then it is that pod.
* Addresses nobody owns are classified: a user-defined named CIDR group (longest prefix wins), else
  loopback, multicast, link-local, private (RFC 1918, RFC 6598, ULA, documentation ranges) or public. The raw
  address of an unknown peer never becomes a name.
"""

from __future__ import annotations

import bisect
import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from otelflow.meta.model import HostMeta, NodeMeta, Peer, PodMeta, ServiceMeta

Owner = PodMeta | NodeMeta | ServiceMeta | HostMeta
DEFAULT_HISTORY = 300.0


@dataclass(slots=True)
class _Span:
    start: float
    end: float | None  # None: current owner
    owner: Owner


class CidrGroups:
    """Named CIDR groups with longest-prefix matching."""

    def __init__(self, groups: Iterable[tuple[str, str]] = ()) -> None:
        self._nets: list[tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        for name, cidr in groups:
            self.add(name, cidr)

    def add(self, name: str, cidr: str) -> None:
        net = ipaddress.ip_network(cidr, strict=False)
        self._nets.append((net.prefixlen, net, name))
        self._nets.sort(key=lambda t: -t[0])

    def match(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        for _, net, name in self._nets:
            if ip.version == net.version and ip in net:
                return name
        return None


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def classify(addr: str, groups: CidrGroups) -> str:
    """Class of an address nobody in the index owns."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "invalid"
    named = groups.match(ip)
    if named:
        return named
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_multicast:
        return "multicast"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private or (ip.version == 4 and ip in _CGNAT):
        return "private"
    return "public"


class IpIndex:
    """Address -> owner, fed by the metadata cache or the static inventory."""

    def __init__(
        self,
        groups: CidrGroups | None = None,
        history: float = DEFAULT_HISTORY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.groups = groups or CidrGroups()
        self.history = history
        self.clock = clock
        self._spans: dict[str, list[_Span]] = {}
        self._host_ports: dict[tuple[str, int], list[_Span]] = {}
        self.nodes: dict[str, NodeMeta] = {}
        self.pods: dict[tuple[str, str], PodMeta] = {}
        self.services: dict[tuple[str, str], ServiceMeta] = {}
        self._by_backend: dict[tuple[str, str], list[ServiceMeta]] = {}
        self._peer_of: dict[int, tuple[Owner, Peer]] = {}  # id(owner) -> (owner, its Peer)
        self._class_peers: dict[str, Peer] = {}

    # ---- updates ---------------------------------------------------------------------------------
    def _claim(self, table: dict, key: object, owner: Owner, now: float) -> None:
        spans = table.setdefault(key, [])
        if spans and spans[-1].end is None:
            if spans[-1].owner == owner:
                return
            spans[-1].end = now
        spans.append(_Span(now, None, owner))

    def _release(self, table: dict, key: object, owner: Owner, now: float) -> None:
        spans = table.get(key)
        if spans and spans[-1].end is None and _same(spans[-1].owner, owner):
            spans[-1].end = now

    def upsert_node(self, n: NodeMeta, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        old = self.nodes.get(n.name)
        if old:
            for ip in set(old.ips) - set(n.ips):
                self._release(self._spans, ip, old, now)
        self.nodes[n.name] = n
        for ip in n.ips:
            self._claim(self._spans, ip, n, now)
        if old is None or (old.zone, old.region) != (n.zone, n.region):
            self._peer_of.clear()  # pods' peers carry their node's zone: rebuild them lazily

    def delete_node(self, name: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        old = self.nodes.pop(name, None)
        if old:
            for ip in old.ips:
                self._release(self._spans, ip, old, now)

    def upsert_pod(self, p: PodMeta, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        key = (p.namespace, p.name)
        old = self.pods.get(key)
        if old:
            self._drop_pod_addresses(old, now, keep=p)
        self.pods[key] = p
        if p.host_network:
            node = self.nodes.get(p.node)
            for ip in node.ips if node else p.ips:
                for port in p.host_ports:
                    self._claim(self._host_ports, (ip, port), p, now)
        else:
            for ip in p.ips:
                self._claim(self._spans, ip, p, now)

    def delete_pod(self, namespace: str, name: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        old = self.pods.pop((namespace, name), None)
        if old:
            self._drop_pod_addresses(old, now)

    def _drop_pod_addresses(self, old: PodMeta, now: float, keep: PodMeta | None = None) -> None:
        if old.host_network:
            for key in [k for k, spans in self._host_ports.items() if spans and _same(spans[-1].owner, old)]:
                if keep is None or not keep.host_network or key[1] not in keep.host_ports:
                    self._release(self._host_ports, key, old, now)
        else:
            kept = set(keep.ips) if keep is not None and not keep.host_network else set()
            for ip in set(old.ips) - kept:
                self._release(self._spans, ip, old, now)

    def upsert_service(self, s: ServiceMeta, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        old = self.services.get((s.namespace, s.name))
        if old:
            for ip in set(old.ips) - set(s.ips):
                self._release(self._spans, ip, old, now)
        self.services[(s.namespace, s.name)] = s
        for ip in s.ips:
            self._claim(self._spans, ip, s, now)
        if old is not None:
            self._unlink_backends(old)
        self._link_backends(s)

    def delete_service(self, namespace: str, name: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        old = self.services.pop((namespace, name), None)
        if old:
            for ip in old.ips:
                self._release(self._spans, ip, old, now)
            self._unlink_backends(old)

    def _backend_keys(self, s: ServiceMeta) -> set[tuple[str, str]]:
        keys = set()
        for b in s.backends:
            ns, _, pod = b.rpartition("/")
            keys.add((ns or s.namespace, pod))
        return keys

    def _link_backends(self, s: ServiceMeta) -> None:
        for key in self._backend_keys(s):
            self._by_backend.setdefault(key, []).append(s)

    def _unlink_backends(self, s: ServiceMeta) -> None:
        for key in self._backend_keys(s):
            lst = [x for x in self._by_backend.get(key, []) if (x.namespace, x.name) != (s.namespace, s.name)]
            if lst:
                self._by_backend[key] = lst
            else:
                self._by_backend.pop(key, None)

    def upsert_host(self, h: HostMeta, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for ip in h.ips:
            self._claim(self._spans, ip, h, now)

    def prune(self, now: float | None = None) -> int:
        """Forget owners released more than ``history`` seconds ago; returns how many were dropped."""
        now = self.clock() if now is None else now
        cutoff = now - self.history
        dropped = 0
        self._peer_of.clear()  # keeps no released owner alive; rebuilt lazily
        for table in (self._spans, self._host_ports):
            for key in list(table):
                spans = table[key]
                keep = [s for s in spans if s.end is None or s.end >= cutoff]
                dropped += len(spans) - len(keep)
                if keep:
                    table[key] = keep
                else:
                    del table[key]
        return dropped

    # ---- lookups ---------------------------------------------------------------------------------
    def owner(self, addr: str, port: int = 0, at: float | None = None) -> Owner | None:
        if port:
            hp = _pick(self._host_ports.get((addr, port)), at, self.clock(), self.history)
            if hp is not None:
                return hp
        return _pick(self._spans.get(addr), at, self.clock(), self.history)

    def resolve(self, addr: str, port: int = 0, at: float | None = None) -> Peer:
        """The Peer behind an address (port: to single out a host-network pod). The same owner always
        yields the same Peer object (downstream caches may key on identity)."""
        o = self.owner(addr, port, at)
        if o is None:
            cls = classify(addr, self.groups)
            p = self._class_peers.get(cls)
            if p is None:
                p = self._class_peers[cls] = Peer("external", cls)
            return p
        hit = self._peer_of.get(id(o))
        if hit is not None and hit[0] is o:
            return hit[1]
        peer = self._make_peer(o)
        if len(self._peer_of) > 500_000:
            self._peer_of.clear()
        self._peer_of[id(o)] = (o, peer)
        return peer

    def _make_peer(self, o: Owner) -> Peer:
        if isinstance(o, PodMeta):
            node = self.nodes.get(o.node)
            return Peer(
                "pod",
                "pod",
                node=o.node,
                zone=node.zone if node else "",
                region=node.region if node else "",
                namespace=o.namespace,
                name=o.name,
                uid=o.uid,
                workload_name=o.workload_name,
                workload_kind=o.workload_kind,
            )
        if isinstance(o, NodeMeta):
            return Peer("node", "node", node=o.name, zone=o.zone, region=o.region, name=o.name)
        if isinstance(o, ServiceMeta):
            return Peer("service", "service", namespace=o.namespace, name=o.name)
        if isinstance(o, HostMeta):
            return Peer(
                "host",
                "host",
                zone=o.zone,
                region=o.region,
                namespace=o.namespace,
                name=o.name,
                workload_name=o.workload_name,
                workload_kind=o.workload_kind,
            )
        raise TypeError(f"unknown owner {o!r}")

    def service_of(self, addr: str, port: int, transport: str) -> ServiceMeta | None:
        """The Service whose IP and port the client addressed, if any."""
        o = _pick(self._spans.get(addr), None, self.clock(), self.history)
        if isinstance(o, ServiceMeta) and (
            not o.ports or any(p.port == port and p.protocol == transport for p in o.ports)
        ):
            return o
        return None

    def service_for_backend(self, namespace: str, pod: str, port: int, transport: str) -> ServiceMeta | None:
        """The one Service whose backend this pod is on this target port (None when none or several)."""
        hits = [
            s
            for s in self._by_backend.get((namespace, pod), [])
            if any(p.target_port == port and p.protocol == transport for p in s.ports)
        ]
        return hits[0] if len(hits) == 1 else None

    def __len__(self) -> int:
        return len(self._spans) + len(self._host_ports)


def _same(a: Owner, b: Owner) -> bool:
    return (
        type(a) is type(b)
        and getattr(a, "name", None) == getattr(b, "name", None)
        and getattr(a, "namespace", None) == getattr(b, "namespace", None)
    )


def _pick(spans: list[_Span] | None, at: float | None, now: float, history: float) -> Owner | None:
    """The owner at time ``at`` (default now); an owner released within ``history`` still answers."""
    if not spans:
        return None
    t = now if at is None else at
    starts = [s.start for s in spans]
    i = bisect.bisect_right(starts, t) - 1
    if i >= 0:
        s = spans[i]
        if s.end is None or t < s.end or now - s.end <= history:
            return s.owner
    last = spans[-1]
    if last.end is None:
        return last.owner  # the flow predates the current owner's record: best guess is the owner
    return last.owner if now - last.end <= history else None
