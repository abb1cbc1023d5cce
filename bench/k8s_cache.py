#!/usr/bin/env python3
"""Benchmark: the Kubernetes metadata cache with 10k pods in a real kube-apiserver, against the
official ``kubernetes`` Python client listing the same pods.

Run: ``python bench/k8s_cache.py [--pods 10000] [--nodes 50] [--churn-rate 100] [--churn-seconds 30]``.
Needs scripts/build-kube's binaries (otelflow.testing.kubeapi.find_binaries). The comparison needs
the official client in the venv (``.venv/bin/pip install kubernetes``; not a project dependency);
without it that part is skipped.

What it does:

1. starts etcd + kube-apiserver on loopback (a temporary directory, removed at the end);
2. creates ``--nodes`` nodes (zones, InternalIPs), 10 namespaces with ``--pods``/100 Deployments, a
   ReplicaSet each (owned by its Deployment) and 100 pods per ReplicaSet (owned by it), each given
   an IP through pods/status: concurrent requests on keep-alive connections;
3. in a fresh child process: RSS after imports, then a MetadataCache (page size 500) syncs all of
   it; RSS again (the delta is what the cache holds: slim records, the index, the owner maps) and
   the sync time;
4. churn: for ``--churn-seconds`` the parent makes ``--churn-rate`` pod events per second (create
   -> ADDED, set its IP -> MODIFIED, delete an older pod -> MODIFIED + DELETED); the child's CPU
   time over the events it applied gives CPU seconds per 1k events;
5. in fresh child processes: the official client's ``list_pod_for_all_namespaces`` (pages of 500,
   all V1Pod objects kept, as an informer would) and, for scale, otelflow's own client keeping the
   raw JSON dicts: RSS delta and time of each.

Prints the figures and a final line:
``RESULT pods=<n> cache_rss_mib=<delta> cache_sync_s=<s> cpu_s_per_1k_events=<s> events=<n>
official_rss_mib=<delta> official_list_s=<s> raw_dicts_rss_mib=<delta> raw_list_s=<s>``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import ctypes
import gc
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from otelflow.k8s.client import KubeClient, kubeconfig_config  # noqa: E402

NAMESPACES = 10
PODS_PER_RS = 100


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def settle() -> int:
    """RSS after a full collection and giving freed heap back to the OS (what is really held)."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_kib()


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- children ------------------------------------------------------------------------------------


def inner_cache(kubeconfig: str, page_size: int) -> int:
    from otelflow.k8s.cache import MetadataCache
    from otelflow.meta.index import IpIndex

    before = settle()
    client = KubeClient(kubeconfig_config(kubeconfig))
    index = IpIndex()
    cache = MetadataCache(client, index, page_size=page_size)
    t0, c0 = time.monotonic(), cpu_s()
    cache.start()
    if not cache.wait_synced(600):
        print(json.dumps({"error": "not synced", "stats": str(cache.stats())}), flush=True)
        return 1
    sync_s, sync_cpu = time.monotonic() - t0, cpu_s() - c0
    raw_after = rss_kib()
    after = settle()
    st = cache.stats()
    out = {
        "before_kib": before,
        "after_kib": after,
        "after_untrimmed_kib": raw_after,
        "sync_s": sync_s,
        "sync_cpu_s": sync_cpu,
        "pods": st.resources["pods"].objects,
        "index_len": len(index),
    }
    print(json.dumps(out), flush=True)
    # churn: measure CPU between "start" and the moment the events stop coming
    line = sys.stdin.readline().strip()
    assert line == "start", line
    e0 = cache.stats().resources["pods"].events
    c0 = cpu_s()
    line = sys.stdin.readline().strip()
    assert line == "end", line
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 2.0:  # until no event for 2 s
        n = cache.stats().resources["pods"].events
        if n != last:
            last, quiet_since = n, time.monotonic()
        time.sleep(0.05)
    cpu = cpu_s() - c0
    st = cache.stats()
    out = {
        "events": st.resources["pods"].events - e0,
        "cpu_s": cpu,
        "pods": st.resources["pods"].objects,
        "rss_kib": settle(),
        "errors": st.total("errors"),
    }
    print(json.dumps(out), flush=True)
    cache.stop()
    return 0


def inner_official(kubeconfig: str, page_size: int) -> int:
    t_imp = time.monotonic()
    import kubernetes  # type: ignore[import-not-found]

    import_s = time.monotonic() - t_imp
    kubernetes.config.load_kube_config(config_file=kubeconfig)
    v1 = kubernetes.client.CoreV1Api()
    v1.list_node(limit=1)  # connection pool and TLS warmed, like our child's first request
    before = settle()
    t0 = time.monotonic()
    items: list[Any] = []
    cont = None
    while True:
        page = v1.list_pod_for_all_namespaces(limit=page_size, _continue=cont)
        items += page.items
        cont = page.metadata._continue
        if not cont:
            break
    took = time.monotonic() - t0
    out = {
        "before_kib": before,
        "after_kib": settle(),
        "list_s": took,
        "pods": len(items),
        "import_s": import_s,
    }
    print(json.dumps(out), flush=True)
    return 0


def inner_raw(kubeconfig: str, page_size: int) -> int:
    client = KubeClient(kubeconfig_config(kubeconfig))
    client.list("/api/v1/nodes", limit=1)
    before = settle()
    t0 = time.monotonic()
    result = client.list("/api/v1/pods", limit=page_size)
    took = time.monotonic() - t0
    out = {"before_kib": before, "after_kib": settle(), "list_s": took, "pods": len(result.items)}
    print(json.dumps(out), flush=True)
    return 0


# ---- the parent ----------------------------------------------------------------------------------


def pod_body(name: str, rs: dict[str, Any], node: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": app, "pod-template-hash": "5d8f7c9b6d", "tier": "backend"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": rs["metadata"]["name"],
                    "uid": rs["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": app,
                    "image": f"registry.example/{app}:1.4.2",
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"name": "metrics", "containerPort": 9090},
                    ],
                    "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "128Mi"},
                        "limits": {"memory": "256Mi"},
                    },
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5},
                }
            ],
        },
    }


class Maker:
    """Creates objects with concurrent requests (each worker thread keeps its own connection)."""

    def __init__(self, client: KubeClient, workers: int) -> None:
        self.c = client
        self.pool = cf.ThreadPoolExecutor(workers)
        self.ip_lock = threading.Lock()
        self.next_ip = 0

    def ip(self) -> str:
        with self.ip_lock:
            self.next_ip += 1
            n = self.next_ip
        return f"10.{64 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"

    def pod(self, ns: str, name: str, rs: dict[str, Any], node: str, app: str) -> str:
        self.c.request("POST", f"/api/v1/namespaces/{ns}/pods", pod_body(name, rs, node, app))
        ip = self.ip()
        status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1"}
        self.c.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status})
        return name

    def delete(self, ns: str, name: str) -> None:
        self.c.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0")


def child(mode: str, kubeconfig: str, page_size: int, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--inner",
            mode,
            "--kubeconfig",
            kubeconfig,
            "--page-size",
            str(page_size),
        ],
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_json(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.wait()
        raise SystemExit(f"child exited with {p.returncode} without a result")
    out = dict(json.loads(line))
    if "error" in out:
        raise SystemExit(f"child failed: {out}")
    return out


def mib(kib: float) -> float:
    return kib / 1024


def say(*parts: str) -> None:
    print(" ".join(parts), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--churn-rate", type=float, default=100.0, help="pod events per second")
    ap.add_argument("--churn-seconds", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=500)
    ap.add_argument("--inner", choices=["cache", "official", "raw"], help=argparse.SUPPRESS)
    ap.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner == "cache":
        return inner_cache(a.kubeconfig, a.page_size)
    if a.inner == "official":
        return inner_official(a.kubeconfig, a.page_size)
    if a.inner == "raw":
        return inner_raw(a.kubeconfig, a.page_size)

    from otelflow.testing.kubeapi import KubeAPI, find_binaries

    apiserver, etcd = find_binaries()
    with KubeAPI(apiserver, etcd) as api:
        kc = str(api.kubeconfig_path)
        admin = KubeClient(kubeconfig_config(kc))
        mk = Maker(admin, a.workers)
        t0 = time.monotonic()
        namespaces = [f"bench-{i}" for i in range(NAMESPACES)]
        for ns in namespaces:
            api.create_namespace(ns)
        nodes = [f"node-{i:03d}" for i in range(a.nodes)]

        def make_node(i: int, name: str) -> None:
            zone = {"topology.kubernetes.io/zone": f"zone-{i % 3}", "topology.kubernetes.io/region": "eu"}
            admin.request("POST", "/api/v1/nodes", {"metadata": {"name": name, "labels": zone}})
            addrs = [{"type": "InternalIP", "address": f"192.168.{i >> 8}.{i & 255}"}]
            admin.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"addresses": addrs}})

        list(mk.pool.map(make_node, range(len(nodes)), nodes))
        n_rs = max(1, a.pods // PODS_PER_RS)
        tmpl = {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}

        def make_rs(i: int) -> tuple[str, dict[str, Any], str]:
            ns, app = namespaces[i % NAMESPACES], f"app-{i:03d}"
            spec = {"selector": {"matchLabels": {"app": "x"}}, "template": tmpl}
            apps = f"/apis/apps/v1/namespaces/{ns}"
            dep = admin.request("POST", f"{apps}/deployments", {"metadata": {"name": app}, "spec": spec})
            uid = dep["metadata"]["uid"]
            ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": app, "uid": uid, "controller": True}
            meta = {"name": f"{app}-5d8f7c9b6d", "ownerReferences": [ref]}
            rs = admin.request("POST", f"{apps}/replicasets", {"metadata": meta, "spec": spec})
            return ns, rs, app

        rss = list(mk.pool.map(make_rs, range(n_rs)))
        jobs = []
        for i in range(a.pods):
            ns, rs, app = rss[i % n_rs]
            jobs.append(
                mk.pool.submit(mk.pod, ns, f"{app}-5d8f7c9b6d-{i:05d}", rs, nodes[i % len(nodes)], app)
            )
        live: list[tuple[str, str]] = []
        for i, f in enumerate(jobs):
            live.append((rss[i % n_rs][0], f.result()))
        created_s = time.monotonic() - t0
        say(
            f"created {a.nodes} nodes, {n_rs} Deployments+ReplicaSets, {a.pods} pods with IPs",
            f"in {created_s:.1f}s ({2 * a.pods / created_s:.0f} pod requests/s)",
        )

        # -- the cache ----------------------------------------------------------------------------
        cache = child("cache", kc, a.page_size, stdin=subprocess.PIPE)
        synced = read_json(cache)
        delta = synced["after_kib"] - synced["before_kib"]
        say(
            f"cache: synced {synced['pods']} pods in {synced['sync_s']:.2f}s",
            f"({synced['sync_cpu_s']:.2f} CPU s);",
            f"RSS {mib(synced['before_kib']):.1f} -> {mib(synced['after_kib']):.1f} MiB",
            f"(+{mib(delta):.1f} MiB, {delta * 1024 / max(synced['pods'], 1):.0f} B/pod;",
            f"before malloc_trim: {mib(synced['after_untrimmed_kib']):.1f} MiB)",
        )

        # -- churn --------------------------------------------------------------------------------
        assert cache.stdin is not None
        cache.stdin.write("start\n")
        cache.stdin.flush()
        # ADDED, MODIFIED (its IP), and for the older pod deleted: MODIFIED (deletionTimestamp: the
        # API server writes it first even with gracePeriodSeconds=0) + DELETED
        per_cycle = 4
        cycles = int(a.churn_rate * a.churn_seconds / per_cycle)
        interval = per_cycle / a.churn_rate
        t_start = time.monotonic()
        futs = []
        for k in range(cycles):
            due = t_start + k * interval
            time.sleep(max(0.0, due - time.monotonic()))
            ns, rs, app = rss[k % n_rs]
            futs.append(mk.pool.submit(mk.pod, ns, f"{app}-churn-{k:05d}", rs, nodes[k % len(nodes)], app))
            old_ns, old = live.pop(0)
            futs.append(mk.pool.submit(mk.delete, old_ns, old))
        for f in futs:
            f.result()
        churn_s = time.monotonic() - t_start
        cache.stdin.write("end\n")
        cache.stdin.flush()
        churn = read_json(cache)
        cache.wait(30)
        per_1k = churn["cpu_s"] / max(churn["events"], 1) * 1000
        made = cycles * per_cycle
        say(
            f"churn: {made} pod events made in {churn_s:.1f}s ({made / churn_s:.0f}/s);",
            f"the cache applied {churn['events']} using {churn['cpu_s']:.2f} CPU s",
            f"= {per_1k:.3f} CPU s per 1k events; {churn['pods']} pods held,",
            f"RSS {mib(churn['rss_kib']):.1f} MiB, errors {churn['errors']}",
        )

        # -- the same list with the official client, and raw dicts ---------------------------------
        official: dict[str, Any] | None = None
        try:
            import importlib.util

            have = importlib.util.find_spec("kubernetes") is not None
        except ValueError:
            have = False
        if have:
            official = read_json(child("official", kc, a.page_size))
            od = official["after_kib"] - official["before_kib"]
            say(
                f"official kubernetes client: listed {official['pods']} pods in {official['list_s']:.2f}s,",
                f"RSS +{mib(od):.1f} MiB holding them ({od * 1024 / max(official['pods'], 1):.0f} B/pod;",
                f"import {official['import_s']:.2f}s)",
            )
        else:
            print("official kubernetes client: not installed (.venv/bin/pip install kubernetes); skipped")
        raw = read_json(child("raw", kc, a.page_size))
        rd = raw["after_kib"] - raw["before_kib"]
        say(
            f"otelflow client, whole objects as dicts: listed {raw['pods']} pods in {raw['list_s']:.2f}s,",
            f"RSS +{mib(rd):.1f} MiB",
        )
        mk.pool.shutdown()
        admin.close()

        o_rss = f"{mib(official['after_kib'] - official['before_kib']):.1f}" if official else "na"
        o_s = f"{official['list_s']:.2f}" if official else "na"
        say(
            f"RESULT pods={synced['pods']} cache_rss_mib={mib(delta):.1f}",
            f"cache_sync_s={synced['sync_s']:.2f}",
            f"cpu_s_per_1k_events={per_1k:.3f} events={churn['events']}",
            f"official_rss_mib={o_rss} official_list_s={o_s}",
            f"raw_dicts_rss_mib={mib(rd):.1f} raw_list_s={raw['list_s']:.2f}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
