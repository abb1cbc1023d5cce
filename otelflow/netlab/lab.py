"""Build and tear down a netlab cluster in network namespaces.

Layout (see topology.py for the address plan)::

     external host(s) ──┐
                        inet0 ─ [ fabric / router ] ─ fab0 ──┬── eth0 [ node-a ] cbr0 ── vpN ═ eth0 [ pod ]
                                                               └── eth0 [ node-b ] cbr0 ── ...

* every node is a namespace with a bridge (cbr0) holding its pod CIDR; pods are namespaces joined
  to it by a veth pair (hairpin on, as kubelet's bridge plugin does);
* nodes reach each other's pod CIDRs by plain routes over the node network (a flat routed CNI);
* each node runs kube-proxy-like nftables: Service ClusterIPs DNAT to backend pods with random
  load-balancing, hairpin traffic masqueraded, and pod egress to outside the cluster masqueraded
  behind the node's IP (node egress, like a real cloud node);
* conntrack is active in every node (the rules above use it) with nf_conntrack_acct=1, and
  br_netfilter hooks on, so same-node pod-to-pod traffic crossing the bridge is tracked too;
* every endpoint namespace (pods, nodes, external hosts) carries a `netlab_truth` table whose set
  counters count the L3 bytes and packets of each generated flow at the client, independently of
  conntrack and of otelflow (see traffic.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from otelflow.netlab import ns as nsu
from otelflow.netlab.topology import (
    EXTERNAL_NET_V4,
    EXTERNAL_NET_V6,
    MASQ_MARK,
    NODE_NET_V4,
    NODE_NET_V6,
    POD_CIDR_V4,
    POD_CIDR_V6,
    IPAddress,
    Names,
    Topology,
)

log = logging.getLogger(__name__)

TRUTH_TABLE = "netlab_truth"
TRUTH_RULESET = f"""
table inet {TRUTH_TABLE} {{
  set tx {{
    type inet_proto . inet_service
    counter
  }}
  set rx {{
    type inet_proto . inet_service
    counter
  }}
  chain out {{
    type filter hook output priority -400; policy accept;
    meta l4proto . th sport @tx
  }}
  chain in {{
    type filter hook input priority -400; policy accept;
    meta l4proto . th dport @rx
  }}
}}
"""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Something that sends or receives traffic: a pod, a host-network pod, a node or an external host."""

    name: str
    kind: str  # "pod" | "host" (host-network pod or node) | "external"
    netns: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address | None
    node: str | None  # node the endpoint runs on (None for external hosts)

    def ip(self, family: int) -> IPAddress:
        if family == 6:
            if self.ipv6 is None:
                raise nsu.NetlabError(f"{self.name} has no IPv6 address (topology has ipv6: false)")
            return self.ipv6
        return self.ipv4


def _ident(name: str) -> str:
    """nftables identifier from a lab name (names are [a-z0-9-], so this is one-to-one)."""
    return name.replace("-", "_")


def _nodad(addr: str, family: int) -> str:
    return f"{addr} nodad" if family == 6 else addr


class PortAllocator:
    """Client source ports for one lab, never handed out twice while the lab lives."""

    def __init__(self, start: int = 20000, end: int = 60999) -> None:
        self._next = start
        self._end = end
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            if self._next > self._end:
                raise nsu.NetlabError("netlab: client port range exhausted")
            p = self._next
            self._next += 1
            return p


class Lab:
    """A running lab. Use as a context manager: the lab is removed on exit, whatever happened."""

    def __init__(self, topology: Topology, lab_id: str | None = None) -> None:
        self.topology = topology
        # OFL_LAB_TAG (test tooling) prefixes random lab ids, so a test session can tell its own labs
        # from those of other processes on the same machine
        tag = os.environ.get("OFL_LAB_TAG", "")[:4]
        self.names = Names(lab_id or tag + secrets.token_hex(3))
        self.ports = PortAllocator()  # client ports of the traffic generator
        self._up = False

    @property
    def lab_id(self) -> str:
        return self.names.lab_id

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, progress: Callable[[str], None] | None = None) -> None:
        """Build the whole lab; on any failure remove what was built and re-raise."""
        nsu.require_root()
        say = progress or (lambda _msg: None)
        clash = nsu.list_netns(self.names.prefix)
        if clash:  # checked before the cleanup guard below: never remove someone else's lab
            hint = f"'otelflow netlab down {self.lab_id}'"
            raise nsu.NetlabError(f"lab {self.lab_id} already exists ({clash[0]}): remove it with {hint}")
        try:
            say("namespaces")
            self._make_namespaces()
            say("fabric and nodes")
            self._build_router()
            for node in self.topology.nodes:
                self._build_node(node.name)
            say("pods and external hosts")
            for pod in self.topology.pods:
                if not pod.host_network:
                    self._build_pod(pod.name)
            for ext in self.topology.externals:
                self._build_external(ext.name)
            say("offloads")
            self._set_offloads()
            say("kube-proxy rules and conntrack")
            for node in self.topology.nodes:
                nsu.nft_apply(self.names.node(node.name), self.node_ruleset(node.name))
            for ns in self.endpoint_namespaces():
                nsu.nft_apply(ns, TRUTH_RULESET)
        except BaseException:
            self.down()
            raise
        self._up = True
        log.info("lab %s is up: %d namespaces", self.lab_id, len(self.all_namespaces()))

    def down(self) -> None:
        """Remove every namespace of this lab (processes inside are killed first)."""
        left = nsu.delete_netns(nsu.list_netns(self.names.prefix))
        self._up = False
        if left:
            raise nsu.NetlabError(f"lab {self.lab_id}: could not remove namespaces {left}")

    # ---- namespaces ----------------------------------------------------------------------------
    def all_namespaces(self) -> list[str]:
        t, n = self.topology, self.names
        out = [n.router()]
        out += [n.node(x.name) for x in t.nodes]
        out += [n.pod(p.name) for p in t.pods if not p.host_network]
        out += [n.external(e.name) for e in t.externals]
        return out

    def endpoint_namespaces(self) -> list[str]:
        return self.all_namespaces()[1:]

    def _make_namespaces(self) -> None:
        names = self.all_namespaces()
        clash = nsu.list_netns(self.names.prefix)
        if clash:
            raise nsu.NetlabError(
                f"lab {self.lab_id} already exists ({clash[0]}): 'otelflow netlab down {self.lab_id}'"
            )
        nsu.ip_batch(None, [f"netns add {x}" for x in names])
        six = self.topology.ipv6
        base: dict[str, str | int] = {
            "net.ipv6.conf.all.disable_ipv6": 0 if six else 1,
            "net.ipv6.conf.default.disable_ipv6": 0 if six else 1,
            "net.ipv6.conf.all.accept_dad": 0,
            "net.ipv6.conf.default.accept_dad": 0,
            "net.ipv6.conf.default.router_solicitations": 0,
        }
        for x in names:
            nsu.sysctl(x, base)
        fwd = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1}
        nsu.sysctl(self.names.router(), fwd)
        udp = self.topology.conntrack_udp_timeout
        for node in self.topology.nodes:
            nsu.sysctl(
                self.names.node(node.name),
                {
                    **fwd,
                    "net.netfilter.nf_conntrack_acct": 1,
                    "net.netfilter.nf_conntrack_udp_timeout": udp,
                    "net.netfilter.nf_conntrack_udp_timeout_stream": udp,
                    "net.bridge.bridge-nf-call-iptables": 1,
                    "net.bridge.bridge-nf-call-ip6tables": 1,
                },
            )

    def _addrs(self, dev: str, pairs: list[tuple[IPAddress, int]]) -> list[str]:
        out = []
        for ip, plen in pairs:
            if ip.version == 6 and not self.topology.ipv6:
                continue
            out.append(f"addr add {_nodad(f'{ip}/{plen}', ip.version)} dev {dev}")
        return out

    def _build_router(self) -> None:
        t, n = self.topology, self.names
        lines = ["link set lo up", "link add fab0 type bridge", "link set fab0 up"]
        lines += self._addrs("fab0", [(t.router_ip(4), 24), (t.router_ip(6), 64)])
        for i, node in enumerate(t.nodes, 1):
            lines += [
                f"link add n{i} type veth peer name eth0 netns {n.node(node.name)}",
                f"link set n{i} master fab0 up",
            ]
        if t.externals:
            lines += ["link add inet0 type bridge", "link set inet0 up"]
            lines += self._addrs("inet0", [(t.external_router_ip(4), 24), (t.external_router_ip(6), 64)])
            for j, ext in enumerate(t.externals, 1):
                lines += [
                    f"link add x{j} type veth peer name eth0 netns {n.external(ext.name)}",
                    f"link set x{j} master inet0 up",
                ]
        nsu.ip_batch(n.router(), lines)
        # routes to every pod CIDR (so external hosts can reach pods: a flat, VPC-native network)
        routes = []
        for node in t.nodes:
            for fam in t.families:
                routes.append(f"route add {t.pod_cidr(node.name, fam)} via {t.node_ip(node.name, fam)}")
        nsu.ip_batch(n.router(), routes)

    def _build_node(self, node: str) -> None:
        t, n = self.topology, self.names
        lines = ["link set lo up", "link set eth0 up"]
        lines += self._addrs("eth0", [(t.node_ip(node, 4), 24), (t.node_ip(node, 6), 64)])
        lines += ["link add cbr0 type bridge", "link set cbr0 up"]
        lines += self._addrs("cbr0", [(t.bridge_ip(node, 4), 24), (t.bridge_ip(node, 6), 64)])
        for k, pod in enumerate(t.pods_on(node)):
            lines += [
                f"link add vp{k} type veth peer name eth0 netns {n.pod(pod.name)}",
                f"link set vp{k} master cbr0",
                f"link set vp{k} type bridge_slave hairpin on",
                f"link set vp{k} up",
            ]
        nsu.ip_batch(n.node(node), lines)
        routes = []
        for fam in t.families:
            for other in t.nodes:
                if other.name != node:
                    routes.append(f"route add {t.pod_cidr(other.name, fam)} via {t.node_ip(other.name, fam)}")
            routes.append(f"route add default via {t.router_ip(fam)}")
        nsu.ip_batch(n.node(node), routes)

    def _build_pod(self, pod: str) -> None:
        t, n = self.topology, self.names
        node = t.pod(pod).node
        lines = ["link set lo up", "link set eth0 up"]
        lines += self._addrs("eth0", [(t.pod_ip(pod, 4), 24), (t.pod_ip(pod, 6), 64)])
        for fam in t.families:
            lines.append(f"route add default via {t.bridge_ip(node, fam)}")
        nsu.ip_batch(n.pod(pod), lines)

    def _build_external(self, ext: str) -> None:
        t = self.topology
        lines = ["link set lo up", "link set eth0 up"]
        lines += self._addrs("eth0", [(t.external_ip(ext, 4), 24), (t.external_ip(ext, 6), 64)])
        for fam in t.families:
            lines.append(f"route add default via {t.external_router_ip(fam)}")
        nsu.ip_batch(self.names.external(ext), lines)

    def interfaces(self) -> dict[str, list[str]]:
        """Every veth and bridge the lab made, per namespace."""
        t, n = self.topology, self.names
        out: dict[str, list[str]] = {n.router(): ["fab0"] + [f"n{i}" for i in range(1, len(t.nodes) + 1)]}
        if t.externals:
            out[n.router()] += ["inet0"] + [f"x{j}" for j in range(1, len(t.externals) + 1)]
        for node in t.nodes:
            out[n.node(node.name)] = ["eth0", "cbr0"] + [f"vp{k}" for k in range(len(t.pods_on(node.name)))]
        for p in t.pods:
            if not p.host_network:
                out[n.pod(p.name)] = ["eth0"]
        for e in t.externals:
            out[n.external(e.name)] = ["eth0"]
        return out

    def _set_offloads(self) -> None:
        if self.topology.offloads:
            return
        # TSO/GSO/GRO off and gso_max_segs 1: TCP builds MSS-sized packets in the sender, so the
        # sender, every node and the receiver all see (and count) the same wire-sized packets.
        for netns, devs in self.interfaces().items():
            veths = [d for d in devs if d not in ("fab0", "inet0", "cbr0")]
            script = "; ".join(f"ethtool -K {d} tso off gso off gro off" for d in veths)
            nsu.ns_run(netns, ["sh", "-ec", script])
            nsu.ip_batch(netns, [f"link set dev {d} gso_max_segs 1" for d in devs])

    # ---- node rule sets ------------------------------------------------------------------------
    def node_ruleset(self, node: str) -> str:
        """nftables for one node: CNI forwarding + egress masquerade, and kube-proxy Services."""
        t = self.topology
        six = t.ipv6
        cluster4 = f"{{ {POD_CIDR_V4}, {NODE_NET_V4} }}"
        cluster6 = f"{{ {POD_CIDR_V6}, {NODE_NET_V6} }}"
        cni = [
            "table inet cni {",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            "    ct state established,related counter accept",
            "    ct state new counter accept",
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "eth0" ip saddr {POD_CIDR_V4} ip daddr != {cluster4} masquerade',
        ]
        if six:
            cni.append(f'    oifname "eth0" ip6 saddr {POD_CIDR_V6} ip6 daddr != {cluster6} masquerade')
        cni += ["  }", "}"]
        kp = [
            "table inet kubeproxy {",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            "    jump services",
            "  }",
            "  chain output {",
            "    type nat hook output priority -100; policy accept;",
            "    jump services",
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade",
            "  }",
        ]
        dispatch: list[str] = []
        chains: list[str] = []
        for svc in t.services:
            for fam in t.families:
                ipkw = "ip" if fam == 4 else "ip6"
                svc_chain = f"svc_{_ident(svc.namespace)}_{_ident(svc.name)}_v{fam}"
                match = f"{ipkw} daddr {t.service_ip(svc.name, fam)} {svc.protocol} dport {svc.port}"
                dispatch.append(f"    {match} jump {svc_chain}")
                seps = []
                for k, backend in enumerate(svc.backends):
                    sep = f"sep_{_ident(svc.namespace)}_{_ident(svc.name)}_v{fam}_{k}"
                    bip = t.pod_ip(backend, fam)
                    dst = f"{bip}:{svc.target_port}" if fam == 4 else f"[{bip}]:{svc.target_port}"
                    chains += [
                        f"  chain {sep} {{",
                        f"    {ipkw} saddr {bip} meta mark set mark | {MASQ_MARK:#x}",
                        f"    meta l4proto {svc.protocol} dnat {ipkw} to {dst}",
                        "  }",
                    ]
                    seps.append(f"{k} : jump {sep}")
                n = len(svc.backends)
                chains += [
                    f"  chain {svc_chain} {{",
                    f"    numgen random mod {n} vmap {{ {', '.join(seps)} }}",
                    "  }",
                ]
        kp += ["  chain services {", *dispatch, "  }", *chains, "}"]
        return "\n".join(cni + kp) + "\n"

    # ---- endpoints -------------------------------------------------------------------------------
    def endpoint(self, name: str) -> Endpoint:
        """A pod (host-network pods resolve to their node), a node, or an external host by name."""
        t, n = self.topology, self.names

        def make(kind: str, netns: str, ip_of: Callable[[str, int], IPAddress], node: str | None) -> Endpoint:
            v6 = ip_of(name, 6) if t.ipv6 else None
            return Endpoint(name, kind, netns, ip_of(name, 4), v6, node)  # type: ignore[arg-type]

        with contextlib.suppress(KeyError):
            p = t.pod(name)
            if p.host_network:
                return make("host", n.node(p.node), t.pod_ip, p.node)
            return make("pod", n.pod(name), t.pod_ip, p.node)
        with contextlib.suppress(KeyError):
            return make("host", n.node(t.node(name).name), t.node_ip, name)
        if name in {e.name for e in t.externals}:
            return make("external", n.external(name), t.external_ip, None)
        raise KeyError(f"no endpoint named {name!r} in lab {self.lab_id}")

    def inventory(self) -> dict[str, Any]:
        """The lab as an otelflow static inventory (see otelflow.meta.inventory): what a metadata
        cache would know about this cluster. External hosts form the named network "internet"."""
        t = self.topology

        def ips(f: Callable[[str, int], IPAddress], name: str) -> list[str]:
            return [str(f(name, fam)) for fam in t.families]

        inv: dict[str, Any] = {
            "nodes": [
                {"name": n.name, "ips": ips(t.node_ip, n.name), "zone": n.zone, "region": n.region}
                for n in t.nodes
            ],
            "pods": [
                {
                    "namespace": p.namespace,
                    "name": p.name,
                    "node": p.node,
                    "ips": ips(t.pod_ip, p.name),
                    "uid": f"{self.lab_id}-{p.name}",
                    "workload": p.workload,
                    "workload_kind": p.workload_kind,
                    "host_network": p.host_network,
                }
                for p in t.pods
            ],
            "services": [
                {
                    "namespace": s.namespace,
                    "name": s.name,
                    "ips": ips(t.service_ip, s.name),
                    "ports": [{"port": s.port, "target_port": s.target_port, "protocol": s.protocol}],
                    "backends": [f"{t.pod(b).namespace}/{b}" for b in s.backends],
                }
                for s in t.services
            ],
        }
        if t.externals:
            cidrs = [str(EXTERNAL_NET_V4)] + ([str(EXTERNAL_NET_V6)] if t.ipv6 else [])
            inv["networks"] = [{"name": "internet", "cidrs": cidrs}]
        return inv

    def write_inventory(self, path: str) -> str:
        import yaml

        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.inventory(), f, sort_keys=False)
        return path

    def node_netns(self, node: str) -> str:
        self.topology.node(node)
        return self.names.node(node)

    def conntrack_dump(self, node: str, *args: str) -> str:
        """`conntrack -L -o extended` in a node's namespace (for tests and the demo)."""
        return nsu.ns_run(self.node_netns(node), ["conntrack", "-L", "-o", "extended", *args], check=False)


def list_labs() -> dict[str, list[str]]:
    """Every lab on this machine (by lab id) with its namespaces."""
    labs: dict[str, list[str]] = {}
    for netns in nsu.list_netns(Names.PREFIX):
        lab_id = netns[len(Names.PREFIX) :].split("-", 1)[0]
        labs.setdefault(lab_id, []).append(netns)
    return labs


def remove_labs(lab_ids: list[str] | None = None) -> list[str]:
    """Remove the named labs (all when None); return namespaces that could not be removed."""
    labs = list_labs()
    chosen = labs if lab_ids is None else {k: v for k, v in labs.items() if k in lab_ids}
    left: list[str] = []
    for netns_list in chosen.values():
        left += nsu.delete_netns(netns_list)
    return left


@contextlib.contextmanager
def lab(topology: Topology, lab_id: str | None = None) -> Iterator[Lab]:
    with Lab(topology, lab_id) as lb:
        yield lb
