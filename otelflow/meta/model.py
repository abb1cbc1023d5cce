"""Slim metadata records: only what naming a flow needs (whole Kubernetes objects are never kept;
peers that cached them ran out of memory at 20k pods)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PeerKind = Literal["pod", "node", "service", "host", "external"]


@dataclass(frozen=True, slots=True)
class NodeMeta:
    name: str
    ips: tuple[str, ...]
    zone: str = ""
    region: str = ""


@dataclass(frozen=True, slots=True)
class PodMeta:
    namespace: str
    name: str
    node: str
    ips: tuple[str, ...]
    uid: str = ""
    workload_name: str = ""  # the top owner: Deployment, StatefulSet, DaemonSet, CronJob, Job, ...
    workload_kind: str = ""
    host_network: bool = False
    host_ports: tuple[int, ...] = ()  # ports a host-network pod listens on (identify it on a shared node IP)


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int
    protocol: str = "tcp"


@dataclass(frozen=True, slots=True)
class ServiceMeta:
    namespace: str
    name: str
    ips: tuple[str, ...]  # ClusterIPs, plus LoadBalancer ingress and external IPs
    ports: tuple[ServicePort, ...] = ()
    backends: tuple[str, ...] = ()  # "namespace/pod" of the current endpoints


@dataclass(frozen=True, slots=True)
class HostMeta:
    """A host outside Kubernetes, named in the static inventory."""

    name: str
    ips: tuple[str, ...]
    namespace: str = ""
    workload_name: str = ""
    workload_kind: str = ""
    zone: str = ""
    region: str = ""


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of a flow, resolved: who it is, where it runs, and whether it is inside the cluster."""

    kind: PeerKind
    peer_class: (
        str  # pod, node, service, host, or for unknown addresses loopback/link-local/private/public/<group>
    )
    node: str = ""  # node the end runs on ("" outside the cluster)
    zone: str = ""
    region: str = ""
    namespace: str = ""
    name: str = ""  # pod, node, host or service name
    uid: str = ""
    workload_name: str = ""
    workload_kind: str = ""

    @property
    def in_cluster(self) -> bool:
        return self.kind in ("pod", "node")
