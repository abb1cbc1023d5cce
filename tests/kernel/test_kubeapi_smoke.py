"""Smoke test of otelflow.testing.kubeapi: a real etcd + kube-apiserver on loopback.

Binaries: OFL_KUBE_BIN_DIR + OFL_ETCD_BIN, else scripts/build-kube (a full build only
with OFL_BUILD_KUBE=1, otherwise only what an earlier build cached); skipped when none.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelflow.testing.kubeapi import BinariesNotFound, KubeAPI, KubeAPIError, find_binaries

NS = "smoke"


@functools.cache
def binaries() -> tuple[Path, Path] | BinariesNotFound | KubeAPIError:
    # Once per session: a skip or failure in a module fixture is not cached, and a build is slow.
    try:
        return find_binaries()
    except (BinariesNotFound, KubeAPIError) as e:
        return e


@pytest.fixture(scope="module")
def api() -> Iterator[KubeAPI]:
    found = binaries()
    if isinstance(found, BinariesNotFound):
        pytest.skip(f"no kube-apiserver/etcd: {found}")
    if isinstance(found, KubeAPIError):
        pytest.fail(f"building kube-apiserver/etcd was asked for (OFL_BUILD_KUBE=1) and failed: {found}")
    apiserver, etcd = found
    with KubeAPI(apiserver, etcd) as k:
        k.create_namespace(NS)
        yield k


def pod(name: str, node: str = "node-a") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/web:1"}]},
    }


def set_pod_ips(api: KubeAPI, name: str, ips: list[str], host_ip: str = "192.168.0.10") -> dict[str, Any]:
    patch = {
        "status": {
            "phase": "Running",
            "hostIP": host_ip,
            "hostIPs": [{"ip": host_ip}],
            "podIP": ips[0],
            "podIPs": [{"ip": ip} for ip in ips],
        }
    }
    status, out = api.request("PATCH", f"/api/v1/namespaces/{NS}/pods/{name}/status", patch)
    assert status == 200, out
    return dict(out)


def retry(fn: Any, want: int, timeout: float = 15.0) -> tuple[int, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, out = fn()
        if status == want or time.monotonic() > deadline:
            return status, out
        time.sleep(0.25)


def test_version_and_objects(api: KubeAPI) -> None:
    status, ver = api.request("GET", "/version")
    assert status == 200 and ver["gitVersion"].startswith("v1."), ver
    assert api.kubeconfig_path.exists() and api.ca_file.exists()

    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"kubernetes.io/hostname": "node-a"}},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
    }
    api.create("/api/v1/nodes", node)
    addrs = {"status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]}}
    status, out = api.request("PATCH", "/api/v1/nodes/node-a/status", addrs)
    assert status == 200, out

    created = api.create(f"/api/v1/namespaces/{NS}/pods", pod("web-0"))
    assert created["spec"]["serviceAccountName"] == "default"  # ServiceAccount admission ran
    out = set_pod_ips(api, "web-0", ["10.244.1.5", "fd00:10:244:1::5"])
    assert out["status"]["podIP"] == "10.244.1.5"
    status, got = api.request("GET", f"/api/v1/namespaces/{NS}/pods/web-0")
    assert status == 200
    assert [i["ip"] for i in got["status"]["podIPs"]] == ["10.244.1.5", "fd00:10:244:1::5"]
    assert got["spec"]["nodeName"] == "node-a"

    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    svc_out = api.create(f"/api/v1/namespaces/{NS}/services", svc)
    assert ipaddress.ip_address(svc_out["spec"]["clusterIP"]) in ipaddress.ip_network("10.96.0.0/16")
    if "," in api.service_cidr:
        dual = {**svc, "metadata": {"name": "web-dual"}}
        dual["spec"] = {**svc["spec"], "ipFamilyPolicy": "RequireDualStack"}
        dual_out = api.create(f"/api/v1/namespaces/{NS}/services", dual)
        assert len(dual_out["spec"]["clusterIPs"]) == 2, dual_out["spec"]

    api.create(f"/api/v1/namespaces/{NS}/serviceaccounts", {"metadata": {"name": "otelflow-agent"}})


def test_list_pagination(api: KubeAPI) -> None:
    for i in range(1, 6):
        api.create(f"/api/v1/namespaces/{NS}/pods", pod(f"page-{i}"))
    names: list[str] = []
    pages = 0
    cont = ""
    while True:
        path = f"/api/v1/namespaces/{NS}/pods?limit=2" + (f"&continue={cont}" if cont else "")
        status, out = api.request("GET", path)
        assert status == 200, out
        assert len(out["items"]) <= 2
        names += [p["metadata"]["name"] for p in out["items"]]
        pages += 1
        cont = out["metadata"].get("continue", "")
        if not cont:
            break
        assert out["metadata"].get("remainingItemCount", 1) > 0
    assert pages >= 3
    assert sorted(names) == sorted({"web-0", *(f"page-{i}" for i in range(1, 6))})


def test_watch_added_modified_bookmark(api: KubeAPI) -> None:
    status, out = api.request("GET", f"/api/v1/namespaces/{NS}/pods")
    assert status == 200
    rv = out["metadata"]["resourceVersion"]
    events: list[dict[str, Any]] = []
    # timeoutSeconds=8: the watch cache sends a bookmark ~2 s before the deadline.
    params = {"resourceVersion": rv, "allowWatchBookmarks": "true"}

    def run() -> None:
        events.extend(api.watch(f"/api/v1/namespaces/{NS}/pods", params, timeout=8))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    api.create(f"/api/v1/namespaces/{NS}/pods", pod("watched"))
    set_pod_ips(api, "watched", ["10.244.1.7"])
    t.join(20)
    assert not t.is_alive(), "watch did not end"
    kinds = [(e["type"], e["object"]["metadata"].get("name")) for e in events]
    assert ("ADDED", "watched") in kinds, kinds
    assert ("MODIFIED", "watched") in kinds, kinds
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks, kinds
    assert int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) >= int(rv)


def test_watch_too_old_resource_version_is_gone(api: KubeAPI) -> None:
    status, out = api.request("GET", f"/api/v1/namespaces/{NS}/pods")
    assert status == 200
    old_rv = out["metadata"]["resourceVersion"]
    for i in range(3):
        patch = {"metadata": {"labels": {"n": str(i)}}}
        status, out = api.request("PATCH", f"/api/v1/namespaces/{NS}/pods/web-0", patch)
        assert status == 200, out
    # Before: an old resourceVersion is still served from the watch cache's window.
    events = list(api.watch(f"/api/v1/namespaces/{NS}/pods", {"resourceVersion": old_rv}, timeout=2))
    assert [e["type"] for e in events if e["type"] != "BOOKMARK"][:3] == ["MODIFIED"] * 3, events[:3]

    api.expire_history()  # compact etcd + restart the API server (its watch cache re-lists)
    for rv in (old_rv, "1"):
        events = list(api.watch(f"/api/v1/namespaces/{NS}/pods", {"resourceVersion": rv}, timeout=5))
        assert events, f"no answer to the watch from {rv}"
        first = events[0]
        # 410 arrives as an ERROR event carrying a Status (the watch cache's way) or, when the
        # request fails before the stream starts, as the HTTP status itself.
        if first["type"] == "HTTP_ERROR":
            assert first["code"] == 410, first
        else:
            assert first["type"] == "ERROR", (rv, events[:3])
            assert first["object"]["code"] == 410, first
            assert first["object"]["reason"] in ("Expired", "Gone"), first


def test_service_account_token_rbac(api: KubeAPI) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "otelflow-agent"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "services", "nodes"], "verbs": ["get", "list", "watch"]}
        ],
    }
    api.create("/apis/rbac.authorization.k8s.io/v1/clusterroles", role)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "otelflow-agent"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "otelflow-agent"},
        "subjects": [{"kind": "ServiceAccount", "namespace": NS, "name": "otelflow-agent"}],
    }
    api.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding)
    token = api.create_service_account_token(NS, "otelflow-agent")

    status, out = retry(lambda: api.request("GET", "/api/v1/pods", token=token), 200)
    assert status == 200, out
    assert any(p["metadata"]["name"] == "web-0" for p in out["items"])
    for path in ("/api/v1/nodes", "/api/v1/services"):
        status, out = api.request("GET", path, token=token)
        assert status == 200, (path, out)
    status, out = api.request("GET", f"/api/v1/namespaces/{NS}/secrets", token=token)
    assert status == 403, out
    status, out = api.request("DELETE", f"/api/v1/namespaces/{NS}/pods/web-0", token=token)
    assert status == 403, out
    status, out = api.request("GET", "/api/v1/pods", token="not-a-token")
    assert status == 401, out


def test_stop_start_keeps_data(api: KubeAPI) -> None:
    url = api.url
    api.stop()
    assert not api.running
    with pytest.raises(urllib.error.URLError):
        api.request("GET", "/readyz", timeout=3)
    time.sleep(2)
    api.start()
    assert api.url == url and api.running
    status, got = api.request("GET", f"/api/v1/namespaces/{NS}/pods/web-0")
    assert status == 200, got
    assert [i["ip"] for i in got["status"]["podIPs"]] == ["10.244.1.5", "fd00:10:244:1::5"]
    status, svc = api.request("GET", f"/api/v1/namespaces/{NS}/services/web")
    assert status == 200 and svc["spec"]["clusterIP"], svc
    # Tokens survive: same signing key and the ServiceAccount is still in etcd.
    token = api.create_service_account_token(NS, "otelflow-agent")
    status, out = retry(lambda: api.request("GET", "/api/v1/nodes", token=token), 200)
    assert status == 200, out
