"""Register a netlab cluster in a real kube-apiserver, and let lab nodes reach that API server.

`register_lab` creates what a real cluster would hold for the lab: Namespaces, Nodes (zone and region
labels, InternalIPs in both families), the workloads' owner objects (Deployment -> ReplicaSet,
StatefulSet, DaemonSet), Pods on their nodes with the lab's addresses (set through pods/status: no
kubelet runs), dual-stack Services with the lab's ClusterIPs, and their EndpointSlices.

`relays` puts a `NamespaceRelay` (otelflow/netlab/relay.py) in every node namespace: 127.0.0.1:<port>
there is relayed to 127.0.0.1:<port> of this process's namespace, so agents in node namespaces reach
the API server under the address its certificate names, with nothing configured in the machine's own
network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from otelflow.k8s.client import KubeClient
from otelflow.netlab.lab import Lab
from otelflow.netlab.relay import NamespaceRelay

CONTAINER = {"name": "app", "image": "registry.invalid/app:1"}


def _pod_template(labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"labels": labels}, "spec": {"containers": [CONTAINER]}}


def _ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
    }


class LabRegistrar:
    """Creates and deletes the lab's objects in the API server (admin credentials)."""

    def __init__(self, lab: Lab, admin: KubeClient) -> None:
        self.lab = lab
        self.c = admin
        self._owners: dict[tuple[str, str], dict[str, Any]] = {}

    def post(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        return dict(self.c.request("POST", path, obj))

    def namespace(self, name: str) -> None:
        for path, body in (
            ("/api/v1/namespaces", {"metadata": {"name": name}}),
            (f"/api/v1/namespaces/{name}/serviceaccounts", {"metadata": {"name": "default"}}),
        ):
            try:
                self.post(path, body)
            except Exception as e:  # already there is fine
                if "409" not in str(e) and "AlreadyExists" not in str(e):
                    raise

    def nodes(self) -> None:
        t = self.lab.topology
        for n in t.nodes:
            labels = {"topology.kubernetes.io/zone": n.zone, "topology.kubernetes.io/region": n.region}
            self.post(
                "/api/v1/nodes",
                {"metadata": {"name": n.name, "labels": {k: v for k, v in labels.items() if v}}},
            )
            addrs = [{"type": "InternalIP", "address": str(t.node_ip(n.name, f))} for f in t.families]
            addrs.append({"type": "Hostname", "address": n.name})
            self.c.request("PATCH", f"/api/v1/nodes/{n.name}/status", {"status": {"addresses": addrs}})

    def owner(self, namespace: str, workload: str, kind: str) -> dict[str, Any] | None:
        """The object a pod of this workload names as its controller (created once)."""
        if not workload or not kind:
            return None
        key = (namespace, workload)
        if key in self._owners:
            return self._owners[key]
        apps = f"/apis/apps/v1/namespaces/{namespace}"
        labels = {"app": workload}
        spec = {"selector": {"matchLabels": labels}, "template": _pod_template(labels)}
        if kind == "Deployment":
            dep = self.post(
                f"{apps}/deployments",
                {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": workload}, "spec": spec},
            )
            rs_meta = {"name": f"{workload}-5f7c9", "ownerReferences": [_ref(dep)], "labels": labels}
            obj = self.post(
                f"{apps}/replicasets",
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": rs_meta, "spec": spec},
            )
        elif kind == "StatefulSet":
            obj = self.post(
                f"{apps}/statefulsets",
                {
                    "apiVersion": "apps/v1",
                    "kind": "StatefulSet",
                    "metadata": {"name": workload},
                    "spec": {**spec, "serviceName": workload},
                },
            )
        elif kind == "DaemonSet":
            obj = self.post(
                f"{apps}/daemonsets",
                {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": workload}, "spec": spec},
            )
        else:
            return None
        obj.setdefault("apiVersion", "apps/v1")
        self._owners[key] = obj
        return obj

    def pod(
        self,
        name: str,
        namespace: str,
        node: str,
        ips: list[str],
        workload: str = "",
        kind: str = "",
        host_network: bool = False,
    ) -> None:
        meta: dict[str, Any] = {"name": name, "labels": {"app": workload or name}}
        owner = self.owner(namespace, workload, kind)
        if owner:
            meta["ownerReferences"] = [_ref(owner)]
        spec: dict[str, Any] = {"nodeName": node, "containers": [CONTAINER]}
        if host_network:
            spec["hostNetwork"] = True
        self.post(
            f"/api/v1/namespaces/{namespace}/pods",
            {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec},
        )
        status = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}
        self.c.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": status})

    def delete_pod(self, namespace: str, name: str) -> None:
        self.c.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}?gracePeriodSeconds=0")

    def lab_pod(self, name: str) -> None:
        t = self.lab.topology
        p = t.pod(name)
        ips = [str(t.pod_ip(name, f)) for f in t.families]
        self.pod(name, p.namespace, p.node, ips, p.workload, p.workload_kind, p.host_network)

    def services(self) -> None:
        t = self.lab.topology
        for s in t.services:
            ips = [str(t.service_ip(s.name, f)) for f in t.families]
            proto = s.protocol.upper()
            spec: dict[str, Any] = {
                "clusterIP": ips[0],
                "clusterIPs": ips,
                "ipFamilies": ["IPv4", "IPv6"][: len(ips)],
                "ipFamilyPolicy": "RequireDualStack" if len(ips) > 1 else "SingleStack",
                "ports": [{"port": s.port, "targetPort": s.target_port, "protocol": proto}],
            }
            self.post(
                f"/api/v1/namespaces/{s.namespace}/services",
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": s.name}, "spec": spec},
            )
            for fam in t.families:
                eps = [
                    {
                        "addresses": [str(t.pod_ip(b, fam))],
                        "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "namespace": t.pod(b).namespace, "name": b},
                        "nodeName": t.pod(b).node,
                    }
                    for b in s.backends
                ]
                body = {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{s.name}-v{fam}",
                        "labels": {"kubernetes.io/service-name": s.name},
                    },
                    "addressType": "IPv4" if fam == 4 else "IPv6",
                    "endpoints": eps,
                    "ports": [{"port": s.target_port, "protocol": proto}],
                }
                self.post(f"/apis/discovery.k8s.io/v1/namespaces/{s.namespace}/endpointslices", body)

    def register(self, skip_pods: tuple[str, ...] = ()) -> None:
        """Everything of the lab (but the pods named in skip_pods)."""
        t = self.lab.topology
        for ns_name in sorted({p.namespace for p in t.pods} | {s.namespace for s in t.services}):
            self.namespace(ns_name)
        self.nodes()
        for p in t.pods:
            if p.name not in skip_pods:
                self.lab_pod(p.name)
        self.services()


@contextlib.contextmanager
def relays(lab: Lab, port: int) -> Iterator[list[NamespaceRelay]]:
    rs = [NamespaceRelay(lab.node_netns(n.name), port) for n in lab.topology.nodes]
    try:
        yield rs
    finally:
        for r in rs:
            r.close()
