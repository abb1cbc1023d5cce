"""Kubernetes metadata: API objects -> slim records, the store's owner resolution and relist diff,
the client's configuration (kubeconfig, in-cluster, token rotation) and its error messages."""

from __future__ import annotations

import base64
import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from otelflow.config import ConfigError, load_config
from otelflow.k8s.cache import (
    DROP_KEYS,
    RBAC_RULES,
    RESOURCES,
    MetadataStore,
    controller_of,
    node_meta,
    pod_meta,
    service_meta,
    service_spec,
    slice_info,
)
from otelflow.k8s.client import (
    ClientConfig,
    Gone,
    KubeClient,
    KubeConfigError,
    KubeError,
    _decoder,
    _TokenFile,
    in_cluster_config,
    kubeconfig_config,
)
from otelflow.meta.index import IpIndex
from otelflow.meta.model import NodeMeta, PodMeta, ServicePort

MANAGED = [
    {
        "manager": "kube-controller-manager",
        "operation": "Update",
        "apiVersion": "v1",
        "time": "2025-01-10T10:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:ownerReferences": {}}},
    }
]


def owner(kind: str, name: str, controller: bool = True, api: str = "apps/v1") -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": kind,
        "name": name,
        "uid": f"uid-{kind.lower()}-{name}",
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def pod(
    name: str,
    ns: str = "shop",
    ips: tuple[str, ...] = ("10.244.1.5",),
    node: str = "node-a",
    owners: list[dict[str, Any]] | None = None,
    host_network: bool = False,
    phase: str = "Running",
    containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{ns}-{name}",
            "resourceVersion": "4711",
            "creationTimestamp": "2025-01-10T10:00:00Z",
            "labels": {"app": name.split("-")[0], "pod-template-hash": "5d8f7c9b6d"},
            "ownerReferences": owners or [],
            "managedFields": MANAGED,
        },
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "serviceAccountName": "default",
            "restartPolicy": "Always",
            "containers": containers
            or [
                {
                    "name": "app",
                    "image": "registry.example/app:1.2",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "100m"}},
                }
            ],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}],
        },
        "status": {
            "phase": phase,
            "hostIP": "192.168.0.10",
            "podIP": ips[0] if ips else None,
            "podIPs": [{"ip": ip} for ip in ips],
            "conditions": [{"type": "Ready", "status": "True"}],
            "qosClass": "Burstable",
        },
    }


def node(name: str, ips: list[tuple[str, str]], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "labels": {"kubernetes.io/hostname": name, **labels},
        },
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
        "status": {
            "addresses": [{"type": t, "address": a} for t, a in ips]
            + [{"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.35.4"},
        },
    }


def replicaset(name: str, deployment: str | None, ns: str = "shop") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-rs-{name}"}
    if deployment:
        meta["ownerReferences"] = [owner("Deployment", deployment)]
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": meta,
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}},
        "status": {"replicas": 2, "readyReplicas": 2},
    }


def job(name: str, cronjob: str | None, ns: str = "shop") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-job-{name}"}
    if cronjob:
        meta["ownerReferences"] = [owner("CronJob", cronjob, api="batch/v1")]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {}, "status": {"active": 1}}


def service(name: str, ns: str = "shop", **spec: Any) -> dict[str, Any]:
    status = spec.pop("status", {})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-svc-{name}"},
        "spec": {"type": "ClusterIP", "sessionAffinity": "None", **spec},
        "status": status or {"loadBalancer": {}},
    }


def endpointslice(
    name: str,
    svc: str,
    endpoints: list[tuple[str, str, bool | None]],
    ports: list[dict[str, Any]],
    ns: str = "shop",
) -> dict[str, Any]:
    eps = []
    for addr, pod_name, ready in endpoints:
        cond: dict[str, Any] = {"serving": True, "terminating": False}
        if ready is not None:
            cond["ready"] = ready
        eps.append(
            {
                "addresses": [addr],
                "conditions": cond,
                "nodeName": "node-a",
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod_name, "uid": f"uid-{pod_name}"},
            }
        )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": "x"},
            "ownerReferences": [owner("Service", svc, api="v1")],
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": ports,
    }


def store() -> MetadataStore:
    return MetadataStore(IpIndex(history=300, clock=lambda: 1000.0))


# ---- conversions -----------------------------------------------------------------------------------


def test_node_zone_labels_and_internal_ips_both_families() -> None:
    n = node(
        "node-a",
        [("InternalIP", "192.168.0.10"), ("InternalIP", "fd00:168::a"), ("ExternalIP", "203.0.113.5")],
        {"topology.kubernetes.io/zone": "eu-1a", "topology.kubernetes.io/region": "eu-1"},
    )
    assert node_meta(n) == NodeMeta("node-a", ("192.168.0.10", "fd00:168::a"), "eu-1a", "eu-1")
    legacy = node(
        "node-b",
        [("InternalIP", "192.168.0.11")],
        {
            "failure-domain.beta.kubernetes.io/zone": "z-old",
            "failure-domain.beta.kubernetes.io/region": "r-old",
        },
    )
    assert node_meta(legacy) == NodeMeta("node-b", ("192.168.0.11",), "z-old", "r-old")
    both = node(
        "node-c", [], {"topology.kubernetes.io/zone": "new", "failure-domain.beta.kubernetes.io/zone": "old"}
    )
    assert node_meta(both).zone == "new"  # the GA label wins


def test_owner_chains() -> None:
    s = store()
    s.apply("replicasets", "ADDED", replicaset("web-5d8f7c9b6d", "web"))
    s.apply("jobs", "ADDED", job("backup-28930500", "backup"))
    s.apply("jobs", "ADDED", job("migrate", None))
    cases = {
        "web-5d8f7c9b6d-x2k4p": ([owner("ReplicaSet", "web-5d8f7c9b6d")], ("web", "Deployment")),
        "backup-28930500-q7d": ([owner("Job", "backup-28930500", api="batch/v1")], ("backup", "CronJob")),
        "migrate-abc": ([owner("Job", "migrate", api="batch/v1")], ("migrate", "Job")),
        "db-0": ([owner("StatefulSet", "db")], ("db", "StatefulSet")),
        "agent-7fx": ([owner("DaemonSet", "agent")], ("agent", "DaemonSet")),
        "legacy-abc": (
            [owner("ReplicationController", "legacy", api="v1")],
            ("legacy", "ReplicationController"),
        ),
        "bare": ([], ("bare", "Pod")),
        # a non-controller owner alone still names the pod; a controller wins over others
        "two": ([owner("Foo", "other", controller=False), owner("StatefulSet", "ss")], ("ss", "StatefulSet")),
    }
    for i, (name, (owners, want)) in enumerate(cases.items()):
        s.apply("pods", "ADDED", pod(name, ips=(f"10.244.2.{i + 1}",), owners=owners))
        got = s.index.pods[("shop", name)]
        assert (got.workload_name, got.workload_kind) == want, name
        peer = s.index.resolve(f"10.244.2.{i + 1}")
        assert (peer.kind, peer.name, peer.workload_name, peer.workload_kind) == ("pod", name, *want)
    assert controller_of({"metadata": {}}) is None


def test_pod_record_dual_stack_and_fields() -> None:
    p = pod("web-0", ips=("10.244.1.5", "fd00:10:244:1:0:0:0:5"))
    rec = pod_meta(p, ("web", "Deployment"))
    assert rec == PodMeta(
        "shop", "web-0", "node-a", ("10.244.1.5", "fd00:10:244:1::5"), "uid-shop-web-0", "web", "Deployment"
    )
    old = copy.deepcopy(p)
    old["status"].pop("podIPs")  # very old servers: podIP only
    assert pod_meta(old, ("x", "Pod")).ips == ("10.244.1.5",)
    pending = pod("new", ips=())
    assert pod_meta(pending, ("new", "Pod")).ips == ()


def test_host_network_pod_host_ports() -> None:
    containers = [
        {"name": "exporter", "image": "x", "ports": [{"containerPort": 9100, "hostPort": 9100}]},
        {
            "name": "side",
            "image": "y",
            "ports": [{"containerPort": 9101}, {"containerPort": 53, "protocol": "UDP"}],
        },
    ]
    p = pod("node-exporter-abc", ips=("192.168.0.10",), owners=[owner("DaemonSet", "node-exporter")],
            host_network=True, containers=containers)  # fmt: skip
    p["spec"]["initContainers"] = [{"name": "sidecar", "image": "z", "restartPolicy": "Always",
                                    "ports": [{"containerPort": 15090}]}]  # fmt: skip
    rec = pod_meta(p, ("node-exporter", "DaemonSet"))
    assert rec.host_network and rec.host_ports == (53, 9100, 9101, 15090)
    s = store()
    s.apply(
        "nodes",
        "ADDED",
        node("node-a", [("InternalIP", "192.168.0.10")], {"topology.kubernetes.io/zone": "z1"}),
    )
    s.apply("pods", "ADDED", p)
    assert s.index.resolve("192.168.0.10", 9100).name == "node-exporter-abc"
    assert s.index.resolve("192.168.0.10", 9100).workload_kind == "DaemonSet"
    assert s.index.resolve("192.168.0.10", 40000).kind == "node"  # any other port: the node
    assert s.index.resolve("192.168.0.10").zone == "z1"
    # ports of a pod on the pod network are not host ports
    assert pod_meta(pod("web-0"), ("web", "Pod")).host_ports == ()


def test_service_ips_and_ports() -> None:
    svc = service(
        "web",
        clusterIP="10.96.0.10",
        clusterIPs=["10.96.0.10", "fd00:96::a"],
        externalIPs=["198.51.100.7"],
        type="LoadBalancer",
        ports=[
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 31080},
            {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
            {"name": "same", "port": 9000},
        ],
        status={"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"hostname": "lb.example"}]}},
    )
    spec = service_spec(svc)
    assert spec.ips == ("10.96.0.10", "fd00:96::a", "198.51.100.7", "203.0.113.9")
    sl = endpointslice(
        "web-abcde",
        "web",
        [("10.244.1.5", "web-0", True), ("10.244.1.6", "web-1", None), ("10.244.1.7", "web-2", False)],
        [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
    )
    info = slice_info(sl)
    assert info is not None and info.service == "web"
    assert info.backends == ("shop/web-0", "shop/web-1")  # ready only (unset counts as ready)
    meta = service_meta("shop", "web", spec, [info])
    assert meta.ips == spec.ips
    assert meta.ports == (
        ServicePort(80, 8080, "tcp"),
        ServicePort(53, 5353, "udp"),
        ServicePort(9000, 9000, "tcp"),
    )
    assert meta.backends == ("shop/web-0", "shop/web-1")
    # a named targetPort with no slice yet: the port is known, its target not (0)
    assert service_meta("shop", "web", spec, []).ports[1] == ServicePort(53, 0, "udp")
    headless = service_spec(service("db", clusterIP="None", clusterIPs=["None"], ports=[{"port": 5432}]))
    assert headless.ips == ()
    # no service-name label: not a Service's slice
    orphan = copy.deepcopy(sl)
    orphan["metadata"]["labels"].pop("kubernetes.io/service-name")
    assert slice_info(orphan) is None


def test_named_target_port_differs_per_slice() -> None:
    spec = service_spec(service("api", clusterIPs=["10.96.0.20"], ports=[{"name": "web", "port": 80,
                                                                         "targetPort": "http"}]))  # fmt: skip
    a = slice_info(
        endpointslice("api-a", "api", [("10.244.1.8", "api-0", True)], [{"name": "web", "port": 8080}])
    )
    b = slice_info(
        endpointslice("api-b", "api", [("10.244.1.9", "api-1", True)], [{"name": "web", "port": 9090}])
    )
    assert a and b
    m = service_meta("shop", "api", spec, [a, b])
    assert m.ports == (ServicePort(80, 8080, "tcp"), ServicePort(80, 9090, "tcp"))


def test_store_services_with_slices_in_any_order() -> None:
    s = store()
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    s.apply("endpointslices", "ADDED", endpointslice("web-1", "web", [("10.244.1.5", "web-0", True)], ports))
    assert ("shop", "web") not in s.index.services  # no Service yet
    web_ports = [{"name": "http", "port": 80, "targetPort": "http"}]
    s.apply("services", "ADDED", service("web", clusterIPs=["10.96.0.10"], ports=web_ports))
    s.apply("endpointslices", "ADDED", endpointslice("web-2", "web", [("10.244.1.6", "web-1", True)], ports))
    svc = s.index.services[("shop", "web")]
    assert svc.backends == ("shop/web-0", "shop/web-1") and svc.ports == (ServicePort(80, 8080, "tcp"),)
    assert s.index.service_of("10.96.0.10", 80, "tcp") is svc
    assert s.index.service_for_backend("shop", "web-1", 8080, "tcp") is svc
    s.apply("endpointslices", "DELETED", endpointslice("web-2", "web", [], ports))
    assert s.index.services[("shop", "web")].backends == ("shop/web-0",)
    s.apply("services", "DELETED", service("web"))
    assert ("shop", "web") not in s.index.services
    assert s.index.resolve("10.96.0.10").kind == "service"  # history: still named for a while


def test_pod_seen_before_its_replicaset_is_renamed_when_it_arrives() -> None:
    s = store()
    s.apply("pods", "ADDED", pod("web-5d8f7c9b6d-abcde", owners=[owner("ReplicaSet", "web-5d8f7c9b6d")]))
    p = s.index.pods[("shop", "web-5d8f7c9b6d-abcde")]
    assert (p.workload_name, p.workload_kind) == ("web-5d8f7c9b6d", "ReplicaSet")
    s.apply("replicasets", "ADDED", replicaset("web-5d8f7c9b6d", "web"))
    p = s.index.pods[("shop", "web-5d8f7c9b6d-abcde")]
    assert (p.workload_name, p.workload_kind) == ("web", "Deployment")
    assert s.index.resolve("10.244.1.5").workload_name == "web"
    assert not s._pending  # nothing left waiting
    # a bare ReplicaSet names its pods itself
    s.apply("replicasets", "ADDED", replicaset("solo", None))
    s.apply("pods", "ADDED", pod("solo-x", ips=("10.244.1.9",), owners=[owner("ReplicaSet", "solo")]))
    assert s.index.resolve("10.244.1.9").workload_kind == "ReplicaSet"
    s.apply("pods", "DELETED", pod("solo-x"))
    assert not s._pending


def test_finished_pods_release_their_ip() -> None:
    s = store()
    s.apply("pods", "ADDED", pod("job-a", ips=("10.244.1.50",), owners=[owner("Job", "j", api="batch/v1")]))
    s.index.clock = lambda: 1000.5
    s.apply("pods", "MODIFIED", pod("job-a", ips=("10.244.1.50",), phase="Succeeded"))
    assert ("shop", "job-a") not in s.index.pods and s.count("pods") == 0
    s.index.clock = lambda: 1001.0
    s.apply("pods", "ADDED", pod("web-9", ips=("10.244.1.50",)))  # the IP handed to a new pod
    s.index.clock = lambda: 1002.0
    s.apply("pods", "MODIFIED", pod("job-a", ips=("10.244.1.50",), phase="Succeeded"))  # late update
    assert s.index.resolve("10.244.1.50").name == "web-9"
    assert s.index.resolve("10.244.1.50", at=1000.2).name == "job-a"  # history


def test_relist_diff_and_recreated_pod() -> None:
    s = store()
    s.apply("pods", "ADDED", pod("a", ips=("10.244.1.1",)))
    s.apply("pods", "ADDED", pod("b", ips=("10.244.1.2",)))
    listed = {s.apply("pods", "ADDED", pod("a", ips=("10.244.1.1",)))}
    for key in s.known["pods"] - listed:
        s.remove("pods", key)
    assert set(s.index.pods) == {("shop", "a")} and s.known["pods"] == {("shop", "a")}
    # recreated with a new IP and uid: old IP keeps the old pod (history), new IP the new one
    s.index.clock = lambda: 1010.0
    s.apply("pods", "DELETED", pod("a"))
    again = pod("a", ips=("10.244.1.3",))
    again["metadata"]["uid"] = "uid-second"
    s.index.clock = lambda: 1020.0
    s.apply("pods", "ADDED", again)
    assert s.index.resolve("10.244.1.3").uid == "uid-second"
    assert s.index.resolve("10.244.1.1").uid == "uid-shop-a"


def test_rbac_rules_cover_exactly_the_watched_resources() -> None:
    groups = {"nodes": "", "pods": "", "services": "", "replicasets": "apps", "jobs": "batch",
              "endpointslices": "discovery.k8s.io"}  # fmt: skip
    granted = {(g, r) for rule in RBAC_RULES for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {(groups[r], r) for r in RESOURCES}
    assert all(sorted(rule["verbs"]) == ["get", "list", "watch"] for rule in RBAC_RULES)


def test_members_dropped_while_parsing_are_never_read() -> None:
    """Parsing with DROP_KEYS left out gives the same records (and drops the bulk)."""
    objs = {
        "pods": pod("web-0", ips=("10.244.1.5", "fd00::5"), owners=[owner("ReplicaSet", "web-5d8f7c9b6d")]),
        "hostpod": pod(
            "exp",
            ips=("192.168.0.10",),
            host_network=True,
            containers=[
                {
                    "name": "e",
                    "image": "x",
                    "ports": [{"containerPort": 9100, "hostPort": 9100}],
                    "env": [{"name": "A", "value": "b"}],
                    "resources": {},
                }
            ],
        ),
        "nodes": node("node-a", [("InternalIP", "192.168.0.10")], {"topology.kubernetes.io/zone": "z"}),
        "services": service(
            "web",
            clusterIPs=["10.96.0.10"],
            ports=[{"name": "http", "port": 80, "targetPort": 8080}],
            externalIPs=["198.51.100.7"],
        ),
        "endpointslices": endpointslice(
            "web-1",
            "web",
            [("10.244.1.5", "web-0", True), ("10.244.1.6", "web-1", False)],
            [{"name": "http", "port": 8080}],
        ),
        "replicasets": replicaset("web-5d8f7c9b6d", "web"),
        "jobs": job("backup-1", "backup"),
    }
    objs["nodes"]["status"]["images"] = [{"names": ["registry.example/big:1"], "sizeBytes": 1}]
    slim = _decoder(DROP_KEYS)
    for name, obj in objs.items():
        raw = json.dumps(obj).encode()
        full, lean = json.loads(raw), slim(raw)
        resource = "pods" if name == "hostpod" else name
        a, b = store(), store()
        a.apply(resource, "ADDED", full)
        b.apply(resource, "ADDED", lean)
        assert (a.index.pods, a.index.nodes, a.index.services, a._rs, a._jobs, a._slices) == (
            b.index.pods,
            b.index.nodes,
            b.index.services,
            b._rs,
            b._jobs,
            b._slices,
        ), name
    lean = slim(json.dumps(objs["pods"]).encode())
    assert "managedFields" not in lean["metadata"] and "resources" not in lean["spec"]["containers"][0]
    assert "images" not in slim(json.dumps(objs["nodes"]).encode())["status"]


# ---- configuration -----------------------------------------------------------------------------


def test_config_section(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("metadata:\n  kubernetes:\n    enabled: true\n    kubeconfig: /k\n    page_size: 100\n")
    k = load_config(f, env={}).metadata.kubernetes
    assert (k.enabled, k.kubeconfig, k.page_size) == ("true", "/k", 100)
    assert load_config(None, env={}).metadata.kubernetes.enabled == "auto"
    env = {
        "OTELFLOW_METADATA__KUBERNETES__ENABLED": "false",
        "OTELFLOW_METADATA__KUBERNETES__PAGE_SIZE": "50",
    }
    k = load_config(None, env=env).metadata.kubernetes
    assert (k.enabled, k.page_size) == ("false", 50)
    f.write_text("metadata:\n  kubernetes:\n    enabled: maybe\n")
    with pytest.raises(ConfigError, match=r"metadata\.kubernetes\.enabled"):
        load_config(f, env={})
    f.write_text("metadata:\n  kubernetes:\n    page_size: 0\n")
    with pytest.raises(ConfigError, match="page_size: must be at least 1"):
        load_config(f, env={})


def _kubeconfig(tmp_path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> str:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": cluster},
            {"name": "other", "cluster": {"server": "https://x"}},
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    p = tmp_path / "kubeconfig"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_kubeconfig_parsing(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    path = _kubeconfig(
        tmp_path,
        {
            "server": "https://127.0.0.1:6443/",
            "certificate-authority-data": base64.b64encode(pem.encode()).decode(),
        },
        {"token": "tok", "client-certificate": "certs/admin.crt", "client-key": "/abs/admin.key"},
    )
    c = kubeconfig_config(path)
    assert c.server == "https://127.0.0.1:6443" and c.ca_data == pem and c.token == "tok"
    assert c.cert_file == str(tmp_path / "certs/admin.crt") and c.key_file == "/abs/admin.key"
    assert "tok" not in repr(c)
    exec_user = _kubeconfig(tmp_path, {"server": "https://h"}, {"exec": {"command": "aws"}})
    with pytest.raises(KubeConfigError, match="exec is not supported"):
        kubeconfig_config(exec_user)
    with pytest.raises(KubeConfigError, match="no context named 'nope'"):
        kubeconfig_config(path, context="nope")
    with pytest.raises(KubeConfigError, match="No such file"):
        kubeconfig_config(str(tmp_path / "missing"))


def test_in_cluster_config_and_token_rotation(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_config(env={}, sa_dir=str(tmp_path))
    env = {"KUBERNETES_SERVICE_HOST": "fd00:96::1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(KubeConfigError, match="token is missing"):
        in_cluster_config(env=env, sa_dir=str(tmp_path))
    (tmp_path / "token").write_text("first\n")
    c = in_cluster_config(env=env, sa_dir=str(tmp_path))
    assert (
        c.server == "https://[fd00:96::1]:443" and c.token_file == str(tmp_path / "token") and not c.ca_file
    )
    tf = _TokenFile(c.token_file)
    assert tf.get() == "first"
    # the kubelet rotates a projected token by swapping a symlink: a new inode
    (tmp_path / "token.new").write_text("second\n")
    (tmp_path / "token.new").replace(tmp_path / "token")
    assert tf.get() == "second"


# ---- the client against a tiny fake server ------------------------------------------------------


class _Fake(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str]] = []

    def log_message(self, *a: Any) -> None:
        pass

    def _send(self, code: int, body: Any, chunks: list[bytes] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        if chunks is None:
            data = json.dumps(body).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for c in chunks:
            self.wfile.write(f"{len(c):x}\r\n".encode() + c + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self) -> None:
        _Fake.seen.append((self.path, self.headers.get("Authorization", "")))
        if self.path.startswith("/api/v1/secrets"):
            msg = 'secrets is forbidden: User "system:serviceaccount:x:y" cannot list resource "secrets"'
            self._send(403, {"kind": "Status", "status": "Failure", "message": msg, "reason": "Forbidden",
                             "code": 403})  # fmt: skip
        elif self.path.startswith("/api/v1/pods?") and "watch=1" in self.path:
            added = json.dumps(
                {"type": "ADDED", "object": {"metadata": {"name": "p", "resourceVersion": "11"}}}
            )
            bm = json.dumps({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}})
            status = {
                "kind": "Status",
                "code": 410,
                "reason": "Expired",
                "message": "too old resource version: 1 (12)",
            }
            gone = json.dumps({"type": "ERROR", "object": status})
            line = (added + "\n" + bm + "\n").encode()
            # an event split across chunks, then the 410 as an ERROR event
            self._send(200, None, [line[:7], line[7:30], line[30:], (gone + "\n").encode()])
        elif self.path.startswith("/api/v1/pods?"):
            page = 2 if "continue=c1" in self.path else 1
            meta = {"resourceVersion": "10", **({"continue": "c1"} if page == 1 else {})}
            self._send(
                200, {"kind": "PodList", "metadata": meta, "items": [{"metadata": {"name": f"p{page}"}}]}
            )
        else:
            self._send(404, {"kind": "Status", "message": "the server could not find the requested resource",
                             "reason": "NotFound", "code": 404})  # fmt: skip


@pytest.fixture
def fake() -> Iterator[KubeClient]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Fake.seen = []
    client = KubeClient(ClientConfig(f"http://127.0.0.1:{srv.server_address[1]}", token="sekrit"))
    try:
        yield client
    finally:
        client.close()
        srv.shutdown()
        srv.server_close()


def test_client_list_watch_and_errors(fake: KubeClient) -> None:
    r = fake.list("/api/v1/pods", limit=1)
    assert [i["metadata"]["name"] for i in r.items] == ["p1", "p2"] and r.resource_version == "10"
    assert "limit=1" in _Fake.seen[0][0] and "continue=c1" in _Fake.seen[1][0]
    assert _Fake.seen[0][1] == "Bearer sekrit"
    events = []
    with pytest.raises(Gone) as gone:
        for kind, obj in fake.watch("/api/v1/pods", "10"):
            events.append((kind, obj["metadata"]["resourceVersion"]))
    assert events == [("ADDED", "11"), ("BOOKMARK", "12")]
    assert gone.value.status == 410 and gone.value.reason == "Expired"
    assert "allowWatchBookmarks=true" in _Fake.seen[-1][0] and "resourceVersion=10" in _Fake.seen[-1][0]
    with pytest.raises(KubeError) as e:
        fake.list("/api/v1/secrets")
    assert e.value.status == 403 and not isinstance(e.value, Gone)
    assert str(e.value) == (
        f"kubernetes API {fake.server}: 403 Forbidden: secrets is forbidden: "
        'User "system:serviceaccount:x:y" cannot list resource "secrets"'
    )
    with pytest.raises(KubeError, match="404 Not Found: the server could not find"):
        fake.get("/nope")


def test_client_unreachable_is_one_line() -> None:
    c = KubeClient(ClientConfig("https://127.0.0.1:1"), connect_timeout=2)
    with pytest.raises(KubeError) as e:
        c.list("/api/v1/pods")
    assert e.value.status is None
    assert str(e.value).startswith("kubernetes API https://127.0.0.1:1: cannot connect:")
    assert "\n" not in str(e.value)
