"""`otelflow top --kubeconfig`: every agent pod read through a real kube-apiserver's pod proxy
(`/api/v1/namespaces/NS/pods/NAME:PORT/proxy/api/v1/top`), no port-forward.

The API server proxies to each pod's `status.podIP`; the agents are host-network pods, so that is
their node's address, which lives inside the lab. The API server runs in this machine's own network
namespace, which has no route into the lab (and the tests add none), so it is started with
`HTTP_PROXY` pointing at `NetnsSocksProxy`: a SOCKS5 proxy on this namespace's loopback whose
upstream sockets are opened inside the lab's fabric namespace, the one that routes to every node.
The API server's proxy transport honours `HTTP_PROXY` like any Go client (loopback, where etcd is,
is never proxied). Everything else is real: discovery by label selector, the API server's proxy,
its error for an unreachable pod, the agents' live views and the merge."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otelflow.k8s.client import KubeClient, kubeconfig_config
from otelflow.netlab import ns as nsu
from otelflow.netlab.agents import agents
from otelflow.netlab.lab import Lab
from otelflow.netlab.relay import pump
from otelflow.netlab.topology import demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator
from otelflow.testing.kubeapi import KubeAPI
from otelflow.top.sources import PodDiscovery

NODES = ["node-a", "node-b"]
PORT = 9465
LABELS = {"app.kubernetes.io/name": "otelflow", "app.kubernetes.io/component": "agent"}


class NetnsSocksProxy:
    """A SOCKS5 proxy (no authentication, CONNECT only) on 127.0.0.1:<port> here whose upstream
    connections are made inside `netns`. SOCKS rather than an HTTP forward proxy because Go writes
    the request's Host header, not the address it dials, into a forward proxy's request line, and
    the API server's pod proxy keeps the client's Host header: only the SOCKS dial names the pod."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.targets: list[tuple[str, int]] = []
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.url = f"socks5://127.0.0.1:{self.port}"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.lsock.accept()
            except OSError:
                return
            self._socks.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise OSError("client went away")
            buf += chunk
        return buf

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            _, nmethods = self._read(conn, 2)
            self._read(conn, nmethods)
            conn.sendall(b"\x05\x00")  # version 5, no authentication
            _, cmd, _, atyp = self._read(conn, 4)
            if atyp == 1:
                host = socket.inet_ntop(socket.AF_INET, self._read(conn, 4))
            elif atyp == 4:
                host = socket.inet_ntop(socket.AF_INET6, self._read(conn, 16))
            else:
                host = self._read(conn, self._read(conn, 1)[0]).decode()
            port = int.from_bytes(self._read(conn, 2), "big")
            self.targets.append((host, port))
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            up = nsu.socket_in(self.netns, fam, socket.SOCK_STREAM)
            self._socks.append(up)
            try:
                if cmd != 1:
                    raise ConnectionRefusedError
                up.connect((host, port))
            except OSError:
                conn.sendall(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
                conn.close()
                return
            conn.sendall(b"\x05\x00\x00\x01" + bytes(6))
            threading.Thread(target=pump, args=(conn, up), daemon=True).start()
            pump(up, conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.lsock.shutdown(socket.SHUT_RDWR)
        self.lsock.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture(scope="module")
def cluster(
    kube_binaries: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[KubeAPI, Lab, NetnsSocksProxy]]:
    with Lab(demo_topology()) as lab:
        proxy = NetnsSocksProxy(lab.names.router())
        try:
            with pytest.MonkeyPatch.context() as mp:  # only the API server's environment has it
                mp.setenv("HTTP_PROXY", proxy.url)
                mp.delenv("NO_PROXY", raising=False)
                mp.delenv("no_proxy", raising=False)
                api = KubeAPI(*kube_binaries)
                api.start()
            with api:
                yield api, lab, proxy
        finally:
            proxy.close()


def register_agent_pod(admin: KubeClient, name: str, node: str, ip: str) -> None:
    meta = {"name": name, "labels": LABELS}
    spec = {"nodeName": node, "hostNetwork": True, "containers": [{"name": "agent", "image": "otelflow"}]}
    admin.request("POST", "/api/v1/namespaces/otelflow/pods", {"metadata": meta, "spec": spec})
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    admin.request("PATCH", f"/api/v1/namespaces/otelflow/pods/{name}/status", {"status": status})


@pytest.fixture(scope="module")
def run(
    cluster: tuple[KubeAPI, Lab, NetnsSocksProxy], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[KubeAPI, Lab, list[FlowResult]]]:
    api, lab, _ = cluster
    t = lab.topology
    admin = KubeClient(kubeconfig_config(str(api.kubeconfig_path)))
    api.create_namespace("otelflow")
    for n in NODES:
        register_agent_pod(admin, f"otelflow-agent-{n}", n, str(t.node_ip(n, 4)))
    # a third agent pod whose address answers nothing (the fabric's own address, no listener)
    register_agent_pod(admin, "otelflow-agent-gone", "node-b", str(t.router_ip(4)))
    # a pod of something else in the namespace: the selector leaves it out
    admin.request(
        "POST",
        "/api/v1/namespaces/otelflow/pods",
        {
            "metadata": {"name": "gateway", "labels": {"app.kubernetes.io/name": "otelflow"}},
            "spec": {"containers": [{"name": "gw", "image": "otelflow"}]},
        },
    )
    inv = lab.write_inventory(str(Path(tmp_path_factory.mktemp("inv")) / "inventory.yaml"))
    env = {
        n: {"OTELFLOW_API__LISTEN": f"{t.node_ip(n, 4)}:{PORT}", "OTELFLOW_API__TOP_WINDOW": "1h"}
        for n in NODES
    }
    with agents(lab, NODES, poll=0.5, inventory=inv, node_env=env):
        done = TrafficGenerator(lab).run(
            [
                FlowSpec("payments-1", "svc/db", up=100_000, down=3_000_000),
                FlowSpec("cart-0", "internet", up=20_000, down=400_000),
            ]
        )
        assert all(r.ok for r in done), [r.error for r in done]
        yield api, lab, done
    admin.close()


def test_discovery_and_exact_through_the_pod_proxy(
    run: tuple[KubeAPI, Lab, list[FlowResult]], cluster: tuple[KubeAPI, Lab, NetnsSocksProxy]
) -> None:
    api, lab, done = run
    proxy = cluster[2]
    client = KubeClient(kubeconfig_config(str(api.kubeconfig_path)))
    disc = PodDiscovery(client, "otelflow", ",".join(f"{k}={v}" for k, v in LABELS.items()), PORT)
    found = disc.agents()
    assert sorted(a.name for a in found) == [
        "otelflow-agent-gone (node-b)",
        "otelflow-agent-node-a (node-a)",
        "otelflow-agent-node-b (node-b)",
    ]
    live = [a for a in found if "gone" not in a.name]
    want = [(r.up_l3_bytes, r.down_l3_bytes) for r in done]
    deadline = time.monotonic() + 30  # the agents' next poll
    while True:
        views = [a.fetch(1000) for a in live]
        got = []
        for r in done:
            up = down = 0
            for v in views:
                for c in v["connections"]:
                    if c["client_port"] == r.client_port:
                        up += round(c["c2s_bps"] * v["span_seconds"])
                        down += round(c["s2c_bps"] * v["span_seconds"])
            got.append((up, down))
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == want
    assert {v["node"] for v in views} == {"node-a", "node-b"}
    client.close()
    # the API server dialed the pods' own addresses (status.podIP:PORT), nothing else
    t = lab.topology
    pod_ips = {str(t.node_ip(n, 4)) for n in NODES} | {str(t.router_ip(4))}
    assert {(str(t.node_ip(n, 4)), PORT) for n in NODES} <= set(proxy.targets)
    assert {ip for ip, _ in proxy.targets} <= pod_ips and {p for _, p in proxy.targets} == {PORT}


def test_top_once_through_the_api_server(run: tuple[KubeAPI, Lab, list[FlowResult]], tmp_path: Path) -> None:
    api, _, _ = run
    p = subprocess.run(
        [sys.executable, "-m", "otelflow", "top", "--kubeconfig", str(api.kubeconfig_path), "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY")},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("otelflow top  agents 2/3"), p.stdout
    db = next(x for x in lines if "data/db" in x)
    assert db.split()[:3] == ["shop/payments", "data/db", "data/db"] and db.endswith("cross-zone")
    assert any(x.startswith("shop/cart") and "[internet]" in x and x.endswith("external") for x in lines)
    (err,) = p.stderr.splitlines()  # the unreachable pod: one line, the API server's own reason
    assert err.startswith("otelflow top: otelflow-agent-gone (node-b): HTTP 503 from the API server: "), err
    assert "connection refused" in err
