"""The demo's export relays: a process in a lab node namespace dials the collector's URL unchanged,
and reaches a server on this namespace's loopback through the node's relay, TLS verified end to end
under the endpoint's host name (resolved to the node's loopback through /etc/netns/<ns>/hosts);
everything the relays set up is gone afterwards."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from otelflow.demo_otlp import NETNS_ETC, export_relays, plan_export, relay_failures
from otelflow.netlab.lab import Lab

# run inside the node namespace (`ip netns exec`, which shows the namespace's hosts file)
CLIENT = """
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca) if ca else None
with socket.create_connection((host, port), timeout=10) as s:
    c = ctx.wrap_socket(s, server_hostname=host) if ctx else s
    c.sendall(b"hello relay")
    print(c.recv(100).decode())
"""


def loopback_name() -> str:
    """This machine's host name, when it resolves to a loopback address here (as on most machines)."""
    name = socket.gethostname()
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        addrs = set()
    if not addrs or not all(a.startswith("127.") for a in addrs):
        pytest.skip(f"host name {name!r} does not resolve to loopback here ({sorted(addrs)})")
    return name


@contextlib.contextmanager
def echo_server(ctx: ssl.SSLContext | None) -> Iterator[int]:
    """Answers one line per connection on 127.0.0.1 (this namespace): 'echo: <what it got>'."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError):
                c = ctx.wrap_socket(conn, server_side=True) if ctx else conn
                c.sendall(b"echo: " + c.recv(100))
                c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield int(ls.getsockname()[1])
    finally:
        with contextlib.suppress(OSError):
            ls.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone would not)
        ls.close()
        t.join(timeout=10)


def dial(netns: str, host: str, port: int, ca: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, host, str(port), ca],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tls_through_the_relay_under_the_host_name(demo_lab: Lab, tmp_path: Path) -> None:
    name = loopback_name()
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]
    out = ["-keyout", str(key), "-out", str(crt)]
    subject = ["-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"]
    subprocess.run(
        ["openssl", "req", "-x509", *ec, *out, *subject],
        check=True,
        capture_output=True,
    )
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(crt), str(key))
    nodes = [demo_lab.node_netns(n.name) for n in demo_lab.topology.nodes]
    with echo_server(sctx) as port:
        plan = plan_export({"OTEL_EXPORTER_OTLP_ENDPOINT": f"https://{name}:{port}"})
        assert plan and plan.endpoint == f"https://{name}:{port}" and plan.port == port
        with export_relays(plan, nodes) as relays:
            for ns in nodes:
                assert (NETNS_ETC / ns / "hosts").read_text().splitlines()[1] == f"127.0.0.1 {name}"
                p = dial(ns, name, port, str(crt))
                assert p.returncode == 0 and p.stdout.strip() == "echo: hello relay", p.stderr[-1500:]
            assert relay_failures(relays) == (2, 0, "")
    for ns in nodes:
        assert not (NETNS_ETC / ns).exists()
    # the relays are closed: nothing listens in the node any more
    assert dial(nodes[0], "127.0.0.1", port).returncode != 0


def test_loopback_address_and_a_collector_that_is_down_is_counted(demo_lab: Lab) -> None:
    node = demo_lab.node_netns(demo_lab.topology.nodes[0].name)
    with echo_server(None) as port:
        plan = plan_export({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
        assert plan and plan.listen_hosts == ["127.0.0.1"]
        with export_relays(plan, [node]) as relays:
            p = dial(node, "127.0.0.1", port)
            assert p.stdout.strip() == "echo: hello relay", p.stderr[-1500:]
            assert not (NETNS_ETC / node).exists()  # an address needs no hosts file
    # the same relay with nothing listening behind it: the failure is counted, with its reason
    with echo_server(None) as port:
        pass
    plan = plan_export({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert plan
    with export_relays(plan, [node]) as relays:
        assert dial(node, "127.0.0.1", port).stdout.strip() == ""  # closed at once: no answer
        total, failed, last = relay_failures(relays)
        assert (total, failed) == (1, 1) and last == f"127.0.0.1:{port}: Connection refused"
