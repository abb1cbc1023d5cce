"""The Kubernetes metadata cache: list+watch of nodes, pods, Services and their EndpointSlices (plus
ReplicaSets and Jobs, to name a pod's top owner), kept as slim records in the agent's IP index.

    cache = MetadataCache(KubeClient(in_cluster_config()), index, page_size=500)
    cache.start()                      # one thread per resource, plus one that prunes the index
    with cache.lock:                   # every reader of the index holds this lock (see below)
        peer = index.resolve("10.244.1.7")
    cache.stats(); cache.staleness_seconds()
    cache.stop()                       # joins the threads

**What is kept.** Never whole objects: a NodeMeta per node, a PodMeta per pod (its top owner already
resolved), a ServiceMeta per Service, and on the side only what composing those needs: for
ReplicaSets and Jobs their owner (name -> Deployment / CronJob), for each EndpointSlice its Service,
ready backends ("namespace/pod") and named ports, for each Service its IPs and ports.

* Nodes: InternalIP addresses (both families); zone and region from ``topology.kubernetes.io/zone``
  and ``/region``, else the ``failure-domain.beta.kubernetes.io/*`` labels.
* Pods: ``status.podIPs``, ``spec.nodeName``, ``metadata.uid``; host-network pods also their host
  ports (hostPort, else containerPort, of every container). Owner: the controller reference; a
  ReplicaSet becomes its Deployment (any controller owner of the ReplicaSet, in fact), a Job its
  CronJob; StatefulSet, DaemonSet, ReplicationController and other controllers name themselves; a pod
  without one is its own workload, kind ``Pod``. A pod whose ReplicaSet/Job has not been seen yet is
  named after the ReplicaSet/Job and renamed when it arrives. Succeeded and Failed pods have handed
  their IP back: they are dropped (their address keeps naming them for ``metadata.history``).
* Services: ``spec.clusterIPs`` (not "None"), ``spec.externalIPs`` and
  ``status.loadBalancer.ingress[].ip``; ports with a numeric targetPort as is, a named targetPort
  resolved through the EndpointSlices' ports (one entry per distinct number; 0 while unknown).
* EndpointSlices (``discovery.k8s.io/v1``, Service from the ``kubernetes.io/service-name`` label):
  the pods (``targetRef``) of ready endpoints only (``conditions.ready`` not false).

**How it stays current.** Per resource: a paginated list, then a watch from the list's
resourceVersion with bookmarks (a BOOKMARK moves the resourceVersion on). 410 Gone (the
resourceVersion fell out of the server's window, e.g. after an API server restart or etcd
compaction): list again, and whatever the index knew that the new list lacks is deleted. Any other
error, or a watch that ends early: reconnect after an exponential backoff with jitter (0.5 s doubling
to 30 s; the delay is drawn in [d/2, d]); a watch the server ends on schedule (timeoutSeconds,
5-10 min) is renewed at once. While the API server is away the index keeps serving what it last
knew; ``staleness_seconds()`` says for how long nothing was heard. The pods thread waits (at most
``dep_wait`` seconds) for the first list of nodes, ReplicaSets and Jobs, so the first pods are named
right away. Every ``prune_interval`` the index forgets owners released longer than its history ago.

**Thread safety.** IpIndex is not thread-safe, and the cache owns one re-entrant lock, ``cache.lock``,
under which every mutation of the index happens (one lock hold per event, per list page and per
prune). Readers take the same lock: the agent's pipeline decorates each batch of flows inside
``with cache.lock:`` (one acquisition per batch, not per flow; a batch of thousands of flows holds it
for milliseconds, and the watch threads simply wait). Holding it across a whole decoration also means
a flow's two ends are named from one consistent state.

**Permissions.** ``RBAC_RULES`` is exactly what the cache reads (get/list/watch, nothing else); the
deployment's ClusterRole is generated from and checked against it.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from otelflow.k8s.client import (
    Gone,
    KubeClient,
    KubeConfigError,
    KubeError,
    Watch,
    in_cluster_available,
    in_cluster_config,
    kubeconfig_config,
)
from otelflow.meta.index import IpIndex
from otelflow.meta.model import NodeMeta, PodMeta, ServiceMeta, ServicePort

__all__ = [
    "RBAC_RULES",
    "RESOURCES",
    "CacheStats",
    "MetadataCache",
    "MetadataStore",
    "ResourceStats",
    "client_from_config",
]

log = logging.getLogger("otelflow.k8s")

_READ = ["get", "list", "watch"]

# What the agent may read: exactly the resources below, read-only. The deployment's ClusterRole is
# generated from this and tests run the cache under a token bound to exactly these rules.
RBAC_RULES: tuple[dict[str, list[str]], ...] = (
    {"apiGroups": [""], "resources": ["nodes", "pods", "services"], "verbs": _READ},
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": _READ},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": _READ},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": _READ},
)

# resource name -> collection path (cluster-wide), in start order
RESOURCES: dict[str, str] = {
    "nodes": "/api/v1/nodes",
    "replicasets": "/apis/apps/v1/replicasets",
    "jobs": "/apis/batch/v1/jobs",
    "pods": "/api/v1/pods",
    "services": "/api/v1/services",
    "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices",
}
# the pods thread's first list waits for these (so the first pods are named right away)
_POD_DEPS = ("nodes", "replicasets", "jobs")

# Members the cache never reads, dropped while the JSON is parsed, at any depth (so also a label or
# annotation key of that name: none is one the cache reads). managedFields alone is often half of
# an object; a node's status.images can be bigger still.
DROP_KEYS = frozenset(
    {
        "managedFields",
        "annotations",
        "env",
        "envFrom",
        "volumeMounts",
        "volumeDevices",
        "volumes",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "lifecycle",
        "securityContext",
        "command",
        "args",
        "containerStatuses",
        "initContainerStatuses",
        "ephemeralContainerStatuses",
        "tolerations",
        "affinity",
        "topologySpreadConstraints",
        "images",
        "volumesInUse",
        "volumesAttached",
        "template",
        "jobTemplate",
    }
)

ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")
REGION_LABELS = ("topology.kubernetes.io/region", "failure-domain.beta.kubernetes.io/region")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_intern = sys.intern
Key = tuple[str, str]  # (namespace, name); ("", name) for nodes


# ---- conversions: API objects -> slim records --------------------------------------------------


def _ip(text: Any) -> str | None:
    try:
        return str(ipaddress.ip_address(str(text)))
    except ValueError:
        return None


def _ips(values: Iterable[Any]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        ip = _ip(v)
        if ip is not None and ip not in out:
            out.append(ip)
    return tuple(out)


def _label(labels: Mapping[str, str], names: Iterable[str]) -> str:
    for n in names:
        if labels.get(n):
            return _intern(str(labels[n]))
    return ""


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return _intern(str(meta.get("namespace") or "")), str(meta.get("name") or "")


def controller_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, name) of the object's controller owner reference (else its first owner), or None."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if not ref or not ref.get("kind") or not ref.get("name"):
        return None
    return _intern(str(ref["kind"])), _intern(str(ref["name"]))


def node_meta(obj: Mapping[str, Any]) -> NodeMeta:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    addrs = (obj.get("status") or {}).get("addresses") or []
    ips = _ips(a.get("address") for a in addrs if a.get("type") == "InternalIP")
    return NodeMeta(
        _intern(str(meta.get("name") or "")), ips, _label(labels, ZONE_LABELS), _label(labels, REGION_LABELS)
    )


def _host_ports(spec: Mapping[str, Any]) -> tuple[int, ...]:
    ports: set[int] = set()
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for p in c.get("ports") or []:
            port = p.get("hostPort") or p.get("containerPort")
            if isinstance(port, int) and port > 0:
                ports.add(port)
    return tuple(sorted(ports))


def pod_meta(obj: Mapping[str, Any], workload: tuple[str, str]) -> PodMeta:
    """The slim record of a pod; ``workload`` is (name, kind) of its top owner."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    host_network = bool(spec.get("hostNetwork"))
    pod_ips = status.get("podIPs") or ([{"ip": status["podIP"]}] if status.get("podIP") else [])
    return PodMeta(
        namespace=_intern(str(meta.get("namespace") or "")),
        name=str(meta.get("name") or ""),
        node=_intern(str(spec.get("nodeName") or "")),
        ips=_ips(p.get("ip") for p in pod_ips),
        uid=str(meta.get("uid") or ""),
        workload_name=workload[0],
        workload_kind=workload[1],
        host_network=host_network,
        host_ports=_host_ports(spec) if host_network else (),
    )


def pod_is_done(obj: Mapping[str, Any]) -> bool:
    """A Succeeded or Failed pod has given its IP back."""
    return (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class SpecPort:
    name: str
    port: int
    target: int | str  # a number, or the name of a container port
    protocol: str  # lower case


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    ips: tuple[str, ...]
    ports: tuple[SpecPort, ...]


def service_spec(obj: Mapping[str, Any]) -> ServiceSpec:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    cluster_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    ingress = ((status.get("loadBalancer") or {}).get("ingress")) or []
    ips = _ips(
        [
            *(ip for ip in cluster_ips if ip and ip != "None"),
            *(spec.get("externalIPs") or []),
            *(i.get("ip") for i in ingress if i.get("ip")),
        ]
    )
    ports = []
    for p in spec.get("ports") or []:
        if not isinstance(p.get("port"), int):
            continue
        target = p.get("targetPort", p["port"])
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        ports.append(
            SpecPort(
                _intern(str(p.get("name") or "")),
                p["port"],
                target if isinstance(target, int | str) else p["port"],
                _intern(str(p.get("protocol") or "TCP").lower()),
            )
        )
    return ServiceSpec(ips, tuple(ports))


@dataclass(frozen=True, slots=True)
class SliceInfo:
    service: str
    backends: tuple[str, ...]  # "namespace/pod" of ready endpoints
    ports: tuple[tuple[str, int, str], ...]  # (name, port, protocol)


def slice_info(obj: Mapping[str, Any]) -> SliceInfo | None:
    """An EndpointSlice's Service, ready backends and ports; None when no Service owns it."""
    meta = obj.get("metadata") or {}
    svc = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not svc:
        return None
    ns = str(meta.get("namespace") or "")
    backends: list[str] = []
    for ep in obj.get("endpoints") or []:
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        ref = ep.get("targetRef") or {}
        if ref.get("kind", "Pod") == "Pod" and ref.get("name"):
            b = f"{ref.get('namespace') or ns}/{ref['name']}"
            if b not in backends:
                backends.append(b)
    ports = tuple(
        (_intern(str(p.get("name") or "")), p["port"], _intern(str(p.get("protocol") or "TCP").lower()))
        for p in obj.get("ports") or []
        if isinstance(p.get("port"), int)
    )
    return SliceInfo(_intern(str(svc)), tuple(backends), ports)


def service_meta(ns: str, name: str, spec: ServiceSpec, slices: Iterable[SliceInfo]) -> ServiceMeta:
    """A Service's record: its IPs, ports (named targetPorts resolved via the slices) and backends."""
    slices = list(slices)
    ports: list[ServicePort] = []
    for p in spec.ports:
        if isinstance(p.target, int):
            targets = [p.target]
        else:
            targets = sorted(
                {sp[1] for s in slices for sp in s.ports if sp[0] == p.name and sp[2] == p.protocol}
            )
        for t in targets or [0]:
            sp = ServicePort(p.port, t, p.protocol)
            if sp not in ports:
                ports.append(sp)
    backends = sorted({b for s in slices for b in s.backends})
    return ServiceMeta(ns, name, spec.ips, tuple(ports), tuple(backends))


# ---- the store: slim state + the index (not thread-safe: the cache serialises it) ----------------


class MetadataStore:
    """Applies API objects (list items and watch events) to an IpIndex, keeping only slim records.

    Not thread-safe; MetadataCache calls it under its lock. ``apply`` takes ADDED/MODIFIED/DELETED.
    """

    def __init__(self, index: IpIndex) -> None:
        self.index = index
        self.known: dict[str, set[Key]] = {r: set() for r in RESOURCES}
        self._rs: dict[Key, tuple[str, str]] = {}  # ReplicaSet -> (name, kind) of its owner
        self._jobs: dict[Key, tuple[str, str]] = {}  # Job -> (name, kind) of its owner
        # pods named after their (not yet seen or ownerless) ReplicaSet/Job: (ns, kind, name) -> pods
        self._pending: dict[tuple[str, str, str], set[str]] = {}
        self._svc: dict[Key, ServiceSpec] = {}
        self._slices: dict[Key, SliceInfo] = {}
        self._svc_slices: dict[Key, set[str]] = {}  # (ns, service) -> its slices' names

    def count(self, resource: str) -> int:
        return len(self.known[resource])

    def apply(self, resource: str, event: str, obj: Mapping[str, Any], now: float | None = None) -> Key:
        """Apply one object; returns its key. ``event`` DELETED removes it, anything else upserts."""
        key = key_of(obj)
        if event == "DELETED":
            self.remove(resource, key, now)
            return key
        getattr(self, f"_upsert_{resource}")(key, obj, now)
        return key

    def remove(self, resource: str, key: Key, now: float | None = None) -> None:
        getattr(self, f"_remove_{resource}")(key, now)
        self.known[resource].discard(key)

    # -- nodes -----------------------------------------------------------------------------------
    def _upsert_nodes(self, key: Key, obj: Mapping[str, Any], now: float | None) -> None:
        n = node_meta(obj)
        if self.index.nodes.get(n.name) != n:
            self.index.upsert_node(n, now)
        self.known["nodes"].add(key)

    def _remove_nodes(self, key: Key, now: float | None) -> None:
        self.index.delete_node(key[1], now)

    # -- owners ----------------------------------------------------------------------------------
    def _upsert_owner(self, resource: str, table: dict[Key, tuple[str, str]], key: Key, obj: Any) -> None:
        self.known[resource].add(key)
        ctl = controller_of(obj)
        if ctl is None:
            table.pop(key, None)
            return
        top = (ctl[1], ctl[0])
        if table.get(key) == top:
            return
        table[key] = top
        kind = "ReplicaSet" if resource == "replicasets" else "Job"
        waiting = self._pending.pop((key[0], kind, key[1]), None)
        for pod in waiting or ():
            p = self.index.pods.get((key[0], pod))
            if p is not None and (p.workload_name, p.workload_kind) == (key[1], kind):
                self.index.upsert_pod(replace(p, workload_name=top[0], workload_kind=top[1]))

    def _upsert_replicasets(self, key: Key, obj: Mapping[str, Any], now: float | None) -> None:
        self._upsert_owner("replicasets", self._rs, key, obj)

    def _remove_replicasets(self, key: Key, now: float | None) -> None:
        self._rs.pop(key, None)

    def _upsert_jobs(self, key: Key, obj: Mapping[str, Any], now: float | None) -> None:
        self._upsert_owner("jobs", self._jobs, key, obj)

    def _remove_jobs(self, key: Key, now: float | None) -> None:
        self._jobs.pop(key, None)

    def workload_of(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        """(name, kind) of a pod's top owner, as far as the owners seen so far tell."""
        ns, name = key_of(obj)
        ctl = controller_of(obj)
        if ctl is None:
            return name, "Pod"
        kind, owner = ctl
        table = self._rs if kind == "ReplicaSet" else self._jobs if kind == "Job" else None
        if table is not None:
            top = table.get((ns, owner))
            if top is not None:
                return top
        return owner, kind

    # -- pods ------------------------------------------------------------------------------------
    def _upsert_pods(self, key: Key, obj: Mapping[str, Any], now: float | None) -> None:
        if pod_is_done(obj):
            self._remove_pods(key, now)
            self.known["pods"].discard(key)
            return
        p = pod_meta(obj, self.workload_of(obj))
        old = self.index.pods.get(key)
        if old is not None and old.workload_kind in ("ReplicaSet", "Job"):
            self._unpend(old)
        if p.workload_kind in ("ReplicaSet", "Job"):
            self._pending.setdefault((p.namespace, p.workload_kind, p.workload_name), set()).add(p.name)
        if old != p:
            self.index.upsert_pod(p, now)
        self.known["pods"].add(key)

    def _unpend(self, p: PodMeta) -> None:
        k = (p.namespace, p.workload_kind, p.workload_name)
        waiting = self._pending.get(k)
        if waiting is not None:
            waiting.discard(p.name)
            if not waiting:
                del self._pending[k]

    def _remove_pods(self, key: Key, now: float | None) -> None:
        old = self.index.pods.get(key)
        if old is not None:
            self._unpend(old)
            self.index.delete_pod(key[0], key[1], now)

    # -- services and endpoint slices -------------------------------------------------------------
    def _refresh_service(self, key: Key, now: float | None) -> None:
        spec = self._svc.get(key)
        if spec is None:
            if key in self.index.services:
                self.index.delete_service(key[0], key[1], now)
            return
        names = self._svc_slices.get(key, ())
        slices = [self._slices[(key[0], n)] for n in sorted(names) if (key[0], n) in self._slices]
        s = service_meta(key[0], key[1], spec, slices)
        if self.index.services.get(key) != s:
            self.index.upsert_service(s, now)

    def _upsert_services(self, key: Key, obj: Mapping[str, Any], now: float | None) -> None:
        self.known["services"].add(key)
        spec = service_spec(obj)
        if self._svc.get(key) != spec:
            self._svc[key] = spec
            self._refresh_service(key, now)

    def _remove_services(self, key: Key, now: float | None) -> None:
        if self._svc.pop(key, None) is not None:
            self._refresh_service(key, now)

    def _upsert_endpointslices(self, key: Key, obj: Mapping[str, Any], now: float | None) -> None:
        info = slice_info(obj)
        if info is None:  # not (or no longer) a Service's slice
            self._remove_endpointslices(key, now)
            self.known["endpointslices"].discard(key)
            return
        self.known["endpointslices"].add(key)
        old = self._slices.get(key)
        if old == info:
            return
        self._slices[key] = info
        svc = (key[0], info.service)
        self._svc_slices.setdefault(svc, set()).add(key[1])
        if old is not None and old.service != info.service:
            self._detach_slice(key, old.service, now)
        self._refresh_service(svc, now)

    def _detach_slice(self, key: Key, service: str, now: float | None) -> None:
        svc = (key[0], service)
        names = self._svc_slices.get(svc)
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._svc_slices[svc]
        self._refresh_service(svc, now)

    def _remove_endpointslices(self, key: Key, now: float | None) -> None:
        old = self._slices.pop(key, None)
        if old is not None:
            self._detach_slice(key, old.service, now)


# ---- the cache: threads, lock, stats --------------------------------------------------------------


@dataclass(slots=True)
class ResourceStats:
    objects: int = 0  # objects of this resource the cache holds
    lists: int = 0  # complete lists (the first one, and every relist)
    relists: int = 0  # lists forced by 410 Gone
    watch_restarts: int = 0  # watches re-opened after one ended or failed
    errors: int = 0  # failed requests and broken streams
    events: int = 0  # ADDED/MODIFIED/DELETED applied
    bookmarks: int = 0
    last_sync: float = 0.0  # wall time of the last complete list (0: never)
    last_heard: float = 0.0  # wall time the API server last answered for this resource (0: never)
    last_error: str = ""
    synced: bool = False  # a first list completed


@dataclass(slots=True)
class CacheStats:
    resources: dict[str, ResourceStats] = field(default_factory=dict)
    prunes: int = 0
    pruned: int = 0  # released owners forgotten by the pruner
    staleness_seconds: float = 0.0
    threads_alive: int = 0

    def total(self, name: str) -> int:
        return sum(int(getattr(r, name)) for r in self.resources.values())


class MetadataCache:
    """Keeps ``index`` current from the API server; see the module docstring."""

    def __init__(
        self,
        client: KubeClient,
        index: IpIndex,
        *,
        page_size: int = 500,
        resources: Iterable[str] = tuple(RESOURCES),
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        watch_read_timeout: float = 120.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        prune_interval: float = 60.0,
        dep_wait: float = 30.0,
    ) -> None:
        self.client = client
        self.index = index
        self.store = MetadataStore(index)
        self.lock = threading.RLock()  # every index mutation and every index reader holds it
        self.page_size = page_size
        self.resources = [r for r in RESOURCES if r in set(resources)]
        self.watch_timeout = watch_timeout
        self.watch_read_timeout = watch_read_timeout
        self.backoff = backoff
        self.prune_interval = prune_interval
        self.dep_wait = dep_wait
        self._stats = {r: ResourceStats() for r in self.resources}
        self._synced = {r: threading.Event() for r in self.resources}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, Watch] = {}
        self._rewind: dict[str, str] = {}
        self._aborted: set[str] = set()  # watches restart_watch() closed (not a failure)
        self._started_mono = 0.0
        self._heard_mono = dict.fromkeys(self.resources, 0.0)
        self._prunes = self._pruned = 0
        self._mu = threading.Lock()  # stats and the maps above; taken inside self.lock, never around it

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("MetadataCache already started")
        self._started_mono = time.monotonic()
        for r in self.resources:
            t = threading.Thread(target=self._run, args=(r,), name=f"k8s-{r}", daemon=True)
            self._threads.append(t)
        self._threads.append(threading.Thread(target=self._prune_loop, name="k8s-prune", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every thread (aborting open requests: this closes the client) and join them."""
        self._stop.set()
        with self._mu:
            watches = list(self._watches.values())
        for w in watches:
            w.close()
        self.client.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> MetadataCache:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once every resource completed a first list (within ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for ev in self._synced.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not ev.wait(left):
                return False
        return True

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def restart_watch(self, resource: str, resource_version: str = "") -> None:
        """Drop ``resource``'s open watch; the next one starts from ``resource_version`` (default:
        where it was). For diagnostics and tests: an old version provokes 410 Gone and a relist."""
        with self._mu:
            if resource_version:
                self._rewind[resource] = resource_version
            w = self._watches.get(resource)
            if w is not None:
                self._aborted.add(resource)
        if w is not None:
            w.close()

    # -- stats -----------------------------------------------------------------------------------

    def staleness_seconds(self) -> float:
        """Seconds since the least recently heard-from resource last heard from the API server
        (a bookmark counts); before any answer, since start()."""
        now = time.monotonic()
        with self._mu:
            oldest = min((self._heard_mono[r] or self._started_mono for r in self.resources), default=now)
        return max(0.0, now - oldest) if self._started_mono else 0.0

    def stats(self) -> CacheStats:
        with self._mu:
            res = {r: replace(s) for r, s in self._stats.items()}
            out = CacheStats(res, self._prunes, self._pruned)
        out.staleness_seconds = self.staleness_seconds()
        out.threads_alive = sum(t.is_alive() for t in self._threads)
        return out

    def _heard(self, resource: str) -> None:
        with self._mu:
            self._heard_mono[resource] = time.monotonic()
            self._stats[resource].last_heard = time.time()

    def _count(self, resource: str, name: str, n: int = 1) -> None:
        with self._mu:
            st = self._stats[resource]
            setattr(st, name, getattr(st, name) + n)

    # -- the loops -------------------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        base, cap = self.backoff
        d = min(cap, base * (2**attempt))
        return random.uniform(d / 2, d)

    def _run(self, resource: str) -> None:
        try:
            self._loop(resource)
        except BaseException:  # pragma: no cover - _loop catches everything; belt and braces
            log.exception("kubernetes %s: watcher thread died", resource)
            raise

    def _loop(self, resource: str) -> None:
        path = RESOURCES[resource]
        if resource == "pods":
            deadline = time.monotonic() + self.dep_wait
            for dep in _POD_DEPS:
                if dep in self._synced and not self._stop.is_set():
                    self._synced[dep].wait(max(0.0, deadline - time.monotonic()))
        rv, need_list, attempt, failing, unreachable = "", True, 0, False, False
        while not self._stop.is_set():
            stage = "list"
            try:
                if need_list:
                    rv = self._list(resource, path)
                    need_list = False
                    attempt, unreachable = 0, False
                    if failing:
                        log.info(
                            "kubernetes %s: in sync again (%d objects)", resource, self._objects(resource)
                        )
                        failing = False
                stage = "watch"
                with self._mu:
                    rv = self._rewind.pop(resource, "") or rv
                low, high = self.watch_timeout
                w = self.client.watch(
                    path,
                    rv,
                    timeout_seconds=int(random.uniform(low, high)),
                    read_timeout=self.watch_read_timeout,
                )  # (no drop_keys: one event at a time is small, and plain json.loads is 3x faster)
                with self._mu:
                    self._watches[resource] = w
                self._heard(resource)
                unreachable = False
                opened, events = time.monotonic(), 0
                if self._stop.is_set():
                    w.close()
                for kind, obj in w:
                    self._heard(resource)
                    meta = obj.get("metadata") or {}
                    rv = str(meta.get("resourceVersion") or rv)
                    if kind == "BOOKMARK":
                        self._count(resource, "bookmarks")
                        continue
                    events += 1
                    self._apply(resource, kind, obj)
                if self._stop.is_set():
                    return
                self._count(resource, "watch_restarts")
                with self._mu:
                    aborted = resource in self._aborted
                    self._aborted.discard(resource)
                if events == 0 and time.monotonic() - opened < 1.0 and not aborted:
                    raise _ShortWatch(f"kubernetes {resource}: watch ended at once")
                attempt = 0
                if failing:
                    log.info("kubernetes %s: watching again", resource)
                    failing = False
            except Gone as e:
                self._count(resource, "relists")
                if stage == "watch":
                    self._count(resource, "watch_restarts")
                log.info("kubernetes %s: %s; listing again", resource, e)
                need_list = True
                if attempt:  # several Gone in a row: do not hammer the server
                    self._stop.wait(self._delay(attempt))
                attempt += 1
            except Exception as e:
                if self._stop.is_set():
                    return
                with self._mu:
                    st = self._stats[resource]
                    st.errors += 1
                    if stage == "watch" and not isinstance(e, _ShortWatch):
                        st.watch_restarts += 1
                    repeated = st.last_error == str(e)
                    st.last_error = str(e)
                answered = isinstance(e, KubeError) and e.status is not None
                if answered and unreachable:
                    # The server is back (it answers, if only with an error, e.g. a 403 while its
                    # RBAC cache warms up after a restart): start the backoff again from its base.
                    attempt = 0
                unreachable = isinstance(e, KubeError) and e.status is None
                delay = self._delay(attempt)
                attempt += 1
                level = logging.DEBUG if repeated else logging.WARNING
                if not isinstance(e, _ShortWatch) and not _expected(e):
                    log.exception("kubernetes %s: unexpected error", resource)
                else:
                    log.log(level, "%s; retrying in %.1fs", e, delay)
                failing = True
                self._stop.wait(delay)
            finally:
                with self._mu:
                    self._watches.pop(resource, None)

    def _objects(self, resource: str) -> int:
        with self._mu:
            return self._stats[resource].objects

    def _apply(self, resource: str, kind: str, obj: Mapping[str, Any]) -> None:
        try:
            with self.lock:
                self.store.apply(resource, kind, obj)
                n = self.store.count(resource)
        except Exception:  # a malformed object must not stop the watch
            log.exception("kubernetes %s: cannot apply a %s event", resource, kind)
            self._count(resource, "errors")
            return
        with self._mu:
            st = self._stats[resource]
            st.events += 1
            st.objects = n

    def _list(self, resource: str, path: str) -> str:
        """List every page into the index, delete what vanished; returns the list's resourceVersion."""
        seen: set[Key] = set()
        rv = ""
        for page in self.client.list_pages(path, self.page_size, drop_keys=DROP_KEYS):
            self._heard(resource)
            rv = page.resource_version or rv
            items, page.items = page.items, []
            with self.lock:
                # Each object is dropped as soon as it is applied, so the slim records made next
                # reuse its memory: otherwise they land among a whole page of parsed JSON and pin
                # that memory after the page is gone (measured: RSS 3x the records at 500 a page).
                for i in range(len(items)):
                    obj, items[i] = items[i], None
                    try:
                        seen.add(self.store.apply(resource, "ADDED", obj))
                    except Exception:
                        log.exception("kubernetes %s: cannot apply a listed object", resource)
                        self._count(resource, "errors")
                    del obj
            del items
            if self._stop.is_set():
                raise _Stopped
        with self.lock:
            vanished = self.store.known[resource] - seen
            for key in vanished:
                self.store.remove(resource, key)
            n = self.store.count(resource)
        if vanished:
            log.info("kubernetes %s: %d objects vanished while not watching", resource, len(vanished))
        with self._mu:
            st = self._stats[resource]
            st.lists += 1
            st.objects = n
            st.last_sync = time.time()
            st.synced = True
        self._synced[resource].set()
        return rv

    def _prune_loop(self) -> None:
        while not self._stop.wait(self.prune_interval):
            try:
                with self.lock:
                    n = self.index.prune()
                with self._mu:
                    self._prunes += 1
                    self._pruned += n
            except Exception:  # pragma: no cover - prune is plain dict work
                log.exception("kubernetes: pruning the index failed")


class _ShortWatch(Exception):
    pass


class _Stopped(Exception):
    pass


def _expected(e: Exception) -> bool:
    return isinstance(e, KubeError | _Stopped)


# ---- from the configuration ----------------------------------------------------------------------


def client_from_config(
    enabled: str,
    kubeconfig: str = "",
    env: Mapping[str, str] | None = None,
    sa_dir: str | None = None,
) -> KubeClient | None:
    """The API client the configuration asks for, or None when the cache is off.

    ``enabled``: "true" (a missing configuration is an error), "false", or "auto" (on when a
    kubeconfig is set or the process runs in a pod with a ServiceAccount token). The kubeconfig,
    when set, wins over the in-cluster configuration. Raises KubeConfigError.
    """
    if enabled == "false":
        return None
    kw: dict[str, Any] = {"env": env} if sa_dir is None else {"env": env, "sa_dir": sa_dir}
    if kubeconfig:
        return KubeClient(kubeconfig_config(kubeconfig))
    if in_cluster_available(**kw):
        return KubeClient(in_cluster_config(**kw))
    if enabled == "auto":
        return None
    raise KubeConfigError(
        "metadata.kubernetes.enabled is true, but there is no kubeconfig (metadata.kubernetes.kubeconfig) "
        "and this is not a pod with a ServiceAccount token (KUBERNETES_SERVICE_HOST, "
        "/var/run/secrets/kubernetes.io/serviceaccount/token)"
    )
