"""The Kubernetes metadata cache against a real kube-apiserver + etcd (otelflow.testing.kubeapi).

The cache runs as the agent would: under a ServiceAccount token bound to a ClusterRole made of
exactly ``RBAC_RULES``, configured from a kubeconfig. Objects are created directly (no controllers
run): Deployment -> ReplicaSet -> Pod and CronJob -> Job -> Pod chains through ownerReferences,
StatefulSet, DaemonSet, bare and host-network pods, Services with EndpointSlices; pod IPs are set
through pods/status. Then: a pod recreated with a new IP, 410 Gone (relist), the API server away
for 60 s, a rotated token file.

Skipped when no kube-apiserver/etcd is built (scripts/build-kube), unless OFL_REQUIRE_KUBE=1: then
a missing API server is an error.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from otelflow.agent import make_index
from otelflow.config import load_config
from otelflow.k8s.cache import RBAC_RULES, MetadataCache
from otelflow.k8s.client import KubeClient, KubeError, in_cluster_config, kubeconfig_config
from otelflow.meta.index import IpIndex
from otelflow.testing.kubeapi import KubeAPI, write_kubeconfig

NS = "shop"
AGENT_NS = "otelflow"
CONTAINER = {
    "name": "app",
    "image": "registry.invalid/app:1",
    "ports": [{"name": "http", "containerPort": 8080}],
}
NODE_A = ("192.168.50.11", "fd00:50::11")
NODE_B = ("192.168.50.12",)


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(kube_binaries: tuple[str, str]) -> Iterator[KubeAPI]:
    with KubeAPI(*kube_binaries) as k:
        k.create_namespace(NS)
        k.create_namespace(AGENT_NS)
        yield k


@pytest.fixture(scope="module")
def admin(api: KubeAPI) -> Iterator[KubeClient]:
    c = KubeClient(kubeconfig_config(str(api.kubeconfig_path)))  # token + client certificate
    yield c
    c.close()


@pytest.fixture(scope="module")
def agent_token(api: KubeAPI, admin: KubeClient) -> str:
    """A token of ServiceAccount otelflow/otelflow-agent, bound to a ClusterRole of RBAC_RULES."""
    admin.request(
        "POST", f"/api/v1/namespaces/{AGENT_NS}/serviceaccounts", {"metadata": {"name": "otelflow-agent"}}
    )
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    role = {"metadata": {"name": "otelflow-agent"}, "rules": [dict(r) for r in RBAC_RULES]}
    admin.request("POST", f"{rbac}/clusterroles", role)
    binding = {
        "metadata": {"name": "otelflow-agent"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "otelflow-agent"},
        "subjects": [{"kind": "ServiceAccount", "namespace": AGENT_NS, "name": "otelflow-agent"}],
    }
    admin.request("POST", f"{rbac}/clusterrolebindings", binding)
    token = api.create_service_account_token(AGENT_NS, "otelflow-agent")
    probe = KubeClient(kubeconfig_config(_kubeconfig(api, token, "probe.kubeconfig")))
    eventually(lambda: _can_list(probe), "the agent's RBAC binding to take effect", 20)
    probe.close()
    return token


@pytest.fixture(scope="module")
def agent_kubeconfig(api: KubeAPI, agent_token: str) -> str:
    return _kubeconfig(api, agent_token, "agent.kubeconfig")


@pytest.fixture(scope="module")
def cache(api: KubeAPI, admin: KubeClient, agent_kubeconfig: str) -> Iterator[MetadataCache]:
    errors: list[str] = []
    old_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        errors.append(
            f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: {args.exc_value}"
        )
        old_hook(args)

    threading.excepthook = hook
    _create_before_start(admin)
    index = IpIndex(history=300)
    c = MetadataCache(
        KubeClient(kubeconfig_config(agent_kubeconfig)),
        index,
        page_size=2,  # several pages per list
        watch_timeout=(20, 30),  # watches end on schedule during the test and are renewed
        prune_interval=5,
    )
    c.start()
    try:
        assert c.wait_synced(60), c.stats()
        yield c
    finally:
        c.stop()
        threading.excepthook = old_hook
        assert not any(t.is_alive() for t in c.threads), "cache threads still running after stop()"
        assert not errors, f"threads died: {errors}"


def _kubeconfig(api: KubeAPI, token: str, name: str) -> str:
    return write_kubeconfig(api, token, api.dir / name)


def _can_list(c: KubeClient) -> bool:
    try:
        c.list("/api/v1/pods", limit=1)
        return True
    except KubeError:
        return False


def eventually(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, KeyError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


# ---- objects -----------------------------------------------------------------------------------


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def template(labels: dict[str, str], restart: str = "Always") -> dict[str, Any]:
    return {"metadata": {"labels": labels}, "spec": {"restartPolicy": restart, "containers": [CONTAINER]}}


def create(c: KubeClient, path: str, obj: dict[str, Any]) -> dict[str, Any]:
    return dict(c.request("POST", path, obj))


def make_pod(
    c: KubeClient,
    name: str,
    ips: tuple[str, ...],
    owner: dict[str, Any] | None = None,
    node: str = "node-a",
    host_network: bool = False,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": node, "containers": [CONTAINER]}
    if host_network:
        spec["hostNetwork"] = True
        spec["containers"] = [
            {
                "name": "exp",
                "image": "registry.invalid/exp:1",
                "ports": [{"containerPort": 9100, "hostPort": 9100}],
            }
        ]
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [owner_ref(owner)]
    p = create(
        c,
        f"/api/v1/namespaces/{NS}/pods",
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec},
    )
    if ips:
        status = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}
        p = c.request("PATCH", f"/api/v1/namespaces/{NS}/pods/{name}/status", {"status": status})
    return dict(p)


def delete_pod(c: KubeClient, name: str) -> None:
    c.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}?gracePeriodSeconds=0")


def make_node(c: KubeClient, name: str, ips: tuple[str, ...], labels: dict[str, str]) -> None:
    create(c, "/api/v1/nodes", {"metadata": {"name": name, "labels": labels}})
    addrs = [{"type": "InternalIP", "address": ip} for ip in ips] + [{"type": "Hostname", "address": name}]
    c.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"addresses": addrs}})


def _create_before_start(c: KubeClient) -> None:
    """What exists before the cache starts (it arrives through the first list)."""
    make_node(
        c, "node-a", NODE_A, {"topology.kubernetes.io/zone": "zone-a", "topology.kubernetes.io/region": "eu"}
    )
    make_node(
        c,
        "node-b",
        NODE_B,
        {
            "failure-domain.beta.kubernetes.io/zone": "zone-b",
            "failure-domain.beta.kubernetes.io/region": "eu-old",
        },
    )
    apps = f"/apis/apps/v1/namespaces/{NS}"
    dep = create(
        c,
        f"{apps}/deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template({"app": "web"})},
        },
    )
    labels = {"app": "web", "pod-template-hash": "7c9f8"}
    rs = {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": "web-7c9f8", "ownerReferences": [owner_ref(dep)]},
        "spec": {"selector": {"matchLabels": labels}, "template": template(labels)},
    }
    rs = create(c, f"{apps}/replicasets", rs)
    make_pod(c, "web-7c9f8-aaaaa", ("10.244.1.10", "fd00:10:244:1::10"), rs, labels=labels)
    make_pod(c, "web-7c9f8-bbbbb", ("10.244.2.10", "fd00:10:244:2::10"), rs, node="node-b", labels=labels)
    make_pod(c, "debug", ("10.244.1.99",))


def _create_after_start(c: KubeClient) -> None:
    """What appears while the cache watches."""
    apps, batch = f"/apis/apps/v1/namespaces/{NS}", f"/apis/batch/v1/namespaces/{NS}"
    cj = create(
        c,
        f"{batch}/cronjobs",
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "backup"},
            "spec": {
                "schedule": "0 3 * * *",
                "jobTemplate": {"spec": {"template": template({"app": "backup"}, "Never")}},
            },
        },
    )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "backup-29000000", "ownerReferences": [owner_ref(cj)]},
        "spec": {"template": template({"app": "backup"}, "Never")},
    }
    job = create(c, f"{batch}/jobs", job)
    make_pod(c, "backup-29000000-x7k2p", ("10.244.1.20",), job)
    sts = create(
        c,
        f"{apps}/statefulsets",
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "db"},
            "spec": {
                "serviceName": "db",
                "selector": {"matchLabels": {"app": "db"}},
                "template": template({"app": "db"}),
            },
        },
    )
    make_pod(c, "db-0", ("10.244.2.30", "fd00:10:244:2::30"), sts, node="node-b")
    ds = create(
        c,
        f"{apps}/daemonsets",
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "agent"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": template({"app": "agent"})},
        },
    )
    make_pod(c, "agent-q8d2m", ("10.244.2.40",), ds, node="node-b")
    make_pod(c, "exporter-node-a", NODE_A, ds, host_network=True)
    svcs = f"/api/v1/namespaces/{NS}/services"
    create(
        c,
        svcs,
        {
            "metadata": {"name": "web"},
            "spec": {
                "ipFamilyPolicy": "RequireDualStack",
                "selector": {"app": "web"},
                "externalIPs": ["198.51.100.10"],
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        },
    )
    create(
        c,
        svcs,
        {
            "metadata": {"name": "web-lb"},
            "spec": {
                "type": "LoadBalancer",
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 443, "targetPort": 8080}],
            },
        },
    )
    c.request(
        "PATCH", f"{svcs}/web-lb/status", {"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}}
    )
    create(
        c,
        svcs,
        {
            "metadata": {"name": "db"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]},
        },
    )
    eps = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"

    def slice_(name: str, svc: str, ends: list[tuple[str, str, bool]], ports: list[dict[str, Any]]) -> None:
        endpoints = [
            {
                "addresses": [a],
                "conditions": {"ready": r},
                "targetRef": {"kind": "Pod", "namespace": NS, "name": p},
            }
            for a, p, r in ends
        ]
        create(
            c,
            eps,
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": name, "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            },
        )

    http = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    slice_(
        "web-abc12", "web", [("10.244.1.10", "web-7c9f8-aaaaa", True), ("10.244.1.99", "debug", False)], http
    )
    slice_("web-def34", "web", [("10.244.2.10", "web-7c9f8-bbbbb", True)], http)
    slice_("web-lb-x1", "web-lb", [("10.244.1.10", "web-7c9f8-aaaaa", True)], http)
    slice_("db-y2", "db", [("10.244.2.30", "db-0", True)], [{"port": 5432, "protocol": "TCP"}])


def peer(cache: MetadataCache, addr: str, port: int = 0, at: float | None = None) -> tuple[str, ...]:
    with cache.lock:
        p = cache.index.resolve(addr, port, at)
    return (p.kind, p.namespace, p.name, p.workload_name, p.workload_kind, p.node, p.zone)


# ---- tests -------------------------------------------------------------------------------------


def test_names_every_address(cache: MetadataCache, admin: KubeClient) -> None:
    st = cache.stats()
    assert st.resources["pods"].lists == 1 and st.resources["pods"].objects == 3, st
    assert peer(cache, "fd00:10:244:1::10") == (
        "pod",
        NS,
        "web-7c9f8-aaaaa",
        "web",
        "Deployment",
        "node-a",
        "zone-a",
    )
    _create_after_start(admin)
    want = {
        "10.244.1.10": ("pod", NS, "web-7c9f8-aaaaa", "web", "Deployment", "node-a", "zone-a"),
        "fd00:10:244:2::10": ("pod", NS, "web-7c9f8-bbbbb", "web", "Deployment", "node-b", "zone-b"),
        "10.244.1.99": ("pod", NS, "debug", "debug", "Pod", "node-a", "zone-a"),
        "10.244.1.20": ("pod", NS, "backup-29000000-x7k2p", "backup", "CronJob", "node-a", "zone-a"),
        "10.244.2.30": ("pod", NS, "db-0", "db", "StatefulSet", "node-b", "zone-b"),
        "fd00:10:244:2::30": ("pod", NS, "db-0", "db", "StatefulSet", "node-b", "zone-b"),
        "10.244.2.40": ("pod", NS, "agent-q8d2m", "agent", "DaemonSet", "node-b", "zone-b"),
        "192.168.50.11": ("node", "", "node-a", "", "", "node-a", "zone-a"),
        "fd00:50::11": ("node", "", "node-a", "", "", "node-a", "zone-a"),
        "192.168.50.12": ("node", "", "node-b", "", "", "node-b", "zone-b"),
        "198.51.100.10": ("service", NS, "web", "", "", "", ""),
        "203.0.113.50": ("service", NS, "web-lb", "", "", "", ""),
    }

    def all_named() -> bool:
        for addr, w in want.items():
            assert peer(cache, addr) == w, (addr, peer(cache, addr))
        with cache.lock:  # and the last objects created: the slices
            assert cache.index.services[(NS, "db")].backends
            assert len(cache.index.services[(NS, "web")].backends) == 2
        return True

    eventually(all_named, "every address named")
    with cache.lock:
        idx = cache.index
        assert idx.resolve("192.168.50.12").region == "eu-old"
        # the host-network pod owns node-a's address on its host port only
        assert peer(cache, NODE_A[0], 9100)[:5] == ("pod", NS, "exporter-node-a", "agent", "DaemonSet")
        assert peer(cache, NODE_A[1], 9100)[2] == "exporter-node-a"
        assert peer(cache, NODE_A[0], 22)[0] == "node"
        web = idx.services[(NS, "web")]
        assert len([ip for ip in web.ips if ":" in ip]) == 1 and len(web.ips) == 3  # dual stack + external
        for ip in web.ips:
            assert idx.resolve(ip).name == "web"
            svc = idx.service_of(ip, 80, "tcp")
            assert svc is not None and svc.name == "web"
        assert [(p.port, p.target_port) for p in web.ports] == [(80, 8080)]  # named target resolved
        assert web.backends == (f"{NS}/web-7c9f8-aaaaa", f"{NS}/web-7c9f8-bbbbb")  # not the unready debug
        assert idx.service_for_backend(NS, "web-7c9f8-bbbbb", 8080, "tcp") is web
        assert idx.service_for_backend(NS, "debug", 8080, "tcp") is None
        # web-7c9f8-aaaaa backs two Services on 8080: no single answer
        assert idx.service_for_backend(NS, "web-7c9f8-aaaaa", 8080, "tcp") is None
        db = idx.services[(NS, "db")]
        assert db.ips == () and db.backends == (f"{NS}/db-0",)
        assert idx.service_for_backend(NS, "db-0", 5432, "tcp") is db
    st = cache.stats()
    assert st.resources["pods"].events >= 5 and st.threads_alive == 7
    assert st.total("errors") == 0, st


def test_pod_recreated_with_a_new_ip(cache: MetadataCache, admin: KubeClient) -> None:
    old = admin.get(f"/api/v1/namespaces/{NS}/pods/debug")
    before = time.time()
    delete_pod(admin, "debug")
    eventually(lambda: (NS, "debug") not in cache.index.pods, "the deletion")
    new = make_pod(admin, "debug", ("10.244.1.98",))
    assert new["metadata"]["uid"] != old["metadata"]["uid"]

    def both() -> bool:
        with cache.lock:
            n, o = cache.index.resolve("10.244.1.98"), cache.index.resolve("10.244.1.99")
            flow_then = cache.index.resolve("10.244.1.99", at=before)
        assert (n.name, n.uid) == ("debug", new["metadata"]["uid"])
        assert (o.name, o.uid) == ("debug", old["metadata"]["uid"])  # within history
        assert flow_then.uid == old["metadata"]["uid"]
        return True

    eventually(both, "old and new IP named")


def test_gone_forces_a_relist(cache: MetadataCache, api: KubeAPI, admin: KubeClient) -> None:
    # 1. etcd compacted and the API server restarted: every resourceVersion the cache holds is now
    #    older than the restarted server's watch cache, so each watch gets 410 and each resource
    #    lists again
    before = cache.stats().resources
    api.expire_history()
    make_pod(admin, "after-expiry", ("10.244.1.77",))

    def relisted() -> bool:
        now = cache.stats().resources
        assert all(now[r].lists > before[r].lists for r in now), {r: now[r].lists for r in now}
        assert all(now[r].relists > before[r].relists for r in now)
        return True

    eventually(relisted, "every resource relisted after 410", 60)
    eventually(lambda: peer(cache, "10.244.1.77")[2] == "after-expiry", "the new pod")
    assert peer(cache, "10.244.2.30")[2] == "db-0"  # the relist kept what still exists
    # 2. an artificially old resourceVersion, now below the watch cache's window: 410 at once.
    #    (On a fresh API server the window starts near revision 1 and such a watch simply replays
    #    history instead.)
    mid = cache.stats().resources["pods"]
    cache.restart_watch("pods", "1")
    eventually(lambda: cache.stats().resources["pods"].lists > mid.lists, "a pods relist")
    assert cache.stats().resources["pods"].relists > mid.relists
    assert peer(cache, "10.244.1.77")[2] == "after-expiry"
    assert cache.stats().threads_alive == 7


def test_api_server_away_for_60s(cache: MetadataCache, api: KubeAPI, admin: KubeClient) -> None:
    assert cache.staleness_seconds() < 45
    errors_before = cache.stats().total("errors")
    api.stop()
    # a pod that disappears while nobody can watch: only a relist can tell
    assert api.etcd_delete(f"/registry/pods/{NS}/agent-q8d2m") == 1
    t0 = time.monotonic()
    staleness = []
    while time.monotonic() - t0 < 60:
        assert peer(cache, "10.244.1.10")[2] == "web-7c9f8-aaaaa"  # still serving the last state
        assert peer(cache, "10.244.2.40")[2] == "agent-q8d2m"
        staleness.append(cache.staleness_seconds())
        time.sleep(5)
    stats = cache.stats()
    assert stats.threads_alive == 7
    assert stats.total("errors") > errors_before, stats
    assert staleness == sorted(staleness) and staleness[-1] >= 55, staleness
    assert "cannot connect" in stats.resources["pods"].last_error, stats.resources["pods"]
    api.start()
    restarted, restarted_wall = time.monotonic(), time.time()
    make_pod(admin, "late-1", ("10.244.1.66", "fd00:10:244:1::66"))

    def converged() -> bool:
        assert peer(cache, "fd00:10:244:1::66")[2] == "late-1"
        with cache.lock:
            assert (NS, "agent-q8d2m") not in cache.index.pods  # the relist's diff deleted it
        # every resource heard from the restarted server (an idle watch hears nothing more until
        # its next bookmark or renewal, so staleness then grows again, up to about a minute)
        heard = {r: s.last_heard for r, s in cache.stats().resources.items()}
        assert all(t > restarted_wall for t in heard.values()), heard
        assert cache.staleness_seconds() <= time.monotonic() - restarted
        return True

    eventually(converged, "convergence after the API server came back", 45)
    took = time.monotonic() - restarted
    stats = cache.stats()
    assert stats.threads_alive == 7
    assert stats.resources["pods"].relists >= 2
    print(f"converged {took:.1f}s after the restart; staleness peaked at {staleness[-1]:.0f}s; stats {stats}")


def test_agent_token_cannot_read_secrets(api: KubeAPI, agent_kubeconfig: str) -> None:
    c = KubeClient(kubeconfig_config(agent_kubeconfig))
    with pytest.raises(KubeError) as e:
        c.list(f"/api/v1/namespaces/{NS}/secrets")
    assert e.value.status == 403
    assert str(e.value).startswith(f"kubernetes API {api.url}: 403 Forbidden: secrets is forbidden: ")
    assert 'User "system:serviceaccount:otelflow:otelflow-agent" cannot list resource "secrets"' in str(
        e.value
    )
    with pytest.raises(KubeError) as e:
        c.request("DELETE", f"/api/v1/namespaces/{NS}/pods/db-0")
    assert e.value.status == 403
    c.list("/apis/discovery.k8s.io/v1/endpointslices")  # what it needs, it may
    c.close()


def test_in_cluster_token_file_is_reread(api: KubeAPI, agent_token: str, tmp_path: Path) -> None:
    shutil.copy(api.ca_file, tmp_path / "ca.crt")
    (tmp_path / "token").write_text("not-a-valid-token")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
    c = KubeClient(in_cluster_config(env=env, sa_dir=str(tmp_path)))
    with pytest.raises(KubeError) as e:
        c.list("/api/v1/nodes")
    assert e.value.status == 401
    (tmp_path / "token.next").write_text(agent_token)
    (tmp_path / "token.next").replace(tmp_path / "token")  # rotation: a new file in place
    assert {n["metadata"]["name"] for n in c.list("/api/v1/nodes").items} == {"node-a", "node-b"}
    c.close()


def test_agent_wiring_starts_and_stops_the_cache(agent_kubeconfig: str, tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text(f"metadata:\n  kubernetes:\n    enabled: true\n    kubeconfig: {agent_kubeconfig}\n")
    index, cache = make_index(load_config(f, env={}))
    assert cache is not None
    try:
        assert cache.wait_synced(30)
        with cache.lock:
            assert index.resolve("10.244.2.30").workload_kind == "StatefulSet"
    finally:
        cache.stop()
    assert not any(t.is_alive() for t in cache.threads)
    off = load_config(None, env={"OTELFLOW_METADATA__KUBERNETES__ENABLED": "false"})
    assert make_index(off)[1] is None
