"""TCP health (bpf/health.bpf.c via otelflow.ebpf.health) against the kernel's own counters.

A lab with pod `a` on node n1 and an external host `ext` (traffic a <-> ext is routed through the
lab's router namespace). Real sockets in those namespaces; TcpHealth's programs are global, so each
check picks the records of the lab's namespaces (by inode) and of the test's own sockets (by tuple).
The independent truth, per socket:

- retransmits: the sending socket's TCP_INFO.tcpi_total_retrans, with segments lost on purpose
  (an nftables rule at the receiver dropping a random 5% of the data segments);
- resets: nftables counters of RST packets per 4-tuple in each namespace's output/input hooks
  (connections to a closed port; SO_LINGER 0 closes), and the namespaces' Tcp MIB counters;
- RTT: TCP_INFO.tcpi_rtt of the receiving socket, after a known one-way delay added by a TUN
  "delay line" in the router (this kernel has no netem qdisc: a process holds every packet routed
  into the TUN device for 20 ms, then writes it back, and policy routing sends it on); the number
  of samples equals the segments the socket received while ESTABLISHED (nftables, minus the
  SYN-ACK);
- open/close: the namespaces' Tcp MIB counters (ActiveOpens, PassiveOpens, AttemptFails,
  EstabResets) and the test's own connection count;
- a tiny map: recorded + dropped equals the truth, per kind.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from otelflow.ebpf import libbpf as lb
from otelflow.ebpf.health import (
    DROP_NAMES,
    FEATURES,
    STAT_NAMES,
    HealthDrain,
    SocketHealth,
    TcpHealth,
    probe_hooks,
)
from otelflow.ebpf.loader import EbpfError
from otelflow.netlab import ns as nsu
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import ExternalSpec, NodeSpec, PodSpec, Topology

TOPOLOGY = Topology(nodes=(NodeSpec("n1"),), pods=(PodSpec("a", "n1"),), externals=(ExternalSpec("ext"),))
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
DELAY_S = 0.020  # one-way delay of the delay line (a -> ext)
TUN_NAME = "hltun0"
TCP_CLOSE = 7
Tuple4 = tuple[str, int, str, int]

_SETS = "".join(
    f"  set {name}{fam} {{ type {addr} . inet_service . {addr} . inet_service; flags dynamic; counter; }}\n"
    for name in ("rst_out", "rst_in", "pk_in")
    for fam, addr in (("4", "ipv4_addr"), ("6", "ipv6_addr"))
)
_V4_KEY = "{ ip saddr . tcp sport . ip daddr . tcp dport }"
_V6_KEY = "{ ip6 saddr . tcp sport . ip6 daddr . tcp dport }"
_RST = "tcp flags & rst == rst"
TRUTH = f"""
table inet hl_truth {{
{_SETS}
  chain out {{
    type filter hook output priority -400; policy accept;
    meta nfproto ipv4 {_RST} update @rst_out4 {_V4_KEY}
    meta nfproto ipv6 {_RST} update @rst_out6 {_V6_KEY}
  }}
  chain in {{
    type filter hook input priority -400; policy accept;
    meta nfproto ipv4 {_RST} update @rst_in4 {_V4_KEY}
    meta nfproto ipv6 {_RST} update @rst_in6 {_V6_KEY}
    meta nfproto ipv4 meta l4proto tcp update @pk_in4 {_V4_KEY}
    meta nfproto ipv6 meta l4proto tcp update @pk_in6 {_V6_KEY}
  }}
}}
"""


# ---- the lab --------------------------------------------------------------------------------------
class DelayLine:
    """Every packet routed into a TUN device of namespace `ns` comes back out of it `delay`
    seconds later (a thread holds it), where policy routing (iif TUN) sends it on."""

    TUNSETIFF = 0x400454CA
    IFF_TUN, IFF_NO_PI = 0x0001, 0x1000

    def __init__(self, ns: str, name: str, delay: float) -> None:
        with nsu.entered(ns):  # a TUN device is created in the namespace of the opener
            self.fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(
            self.fd, self.TUNSETIFF, struct.pack("16sH", name.encode(), self.IFF_TUN | self.IFF_NO_PI)
        )
        self.delay = delay
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-line", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        held: deque[tuple[float, bytes]] = deque()
        while not self._stop.is_set():
            timeout = 0.05 if not held else max(0.0, held[0][0] - time.monotonic())
            r, _, _ = select.select([self.fd], [], [], timeout)
            if r:
                with contextlib.suppress(OSError):
                    held.append((time.monotonic() + self.delay, os.read(self.fd, 65536)))
            now = time.monotonic()
            while held and held[0][0] <= now:
                with contextlib.suppress(OSError):
                    os.write(self.fd, held.popleft()[1])
                    self.packets += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self.fd)  # a non-persistent TUN device goes away with its last fd


def delay_to_external(lab: Lab, line_name: str) -> None:
    """Route the router's traffic to the external host "ext" through the TUN delay line; what
    comes out of the TUN goes on to the external network (policy routing on iif)."""
    router, t = lab.names.router(), lab.topology
    lines = [f"link set {line_name} up"]
    for fam, plen in ((4, 24), (6, 64)):
        net = ipaddress.ip_interface(f"{t.external_router_ip(fam)}/{plen}").network
        ext_ip = t.external_ip("ext", fam)
        lines += [
            f"route add {ext_ip}/{32 if fam == 4 else 128} dev {line_name}",
            f"route add {net} dev inet0 table 100",
        ]
        nsu.run(["ip", f"-{fam}", "-n", router, "rule", "add", "iif", line_name, "lookup", "100"])
    nsu.ip_batch(router, lines)
    nsu.sysctl(router, {"net.ipv4.conf.all.rp_filter": 0, f"net.ipv4.conf.{line_name}.rp_filter": 0})


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(TOPOLOGY) as lab:
        for name in ("a", "ext"):
            nsu.nft_apply(lab.endpoint(name).netns, TRUTH)
        # the delay line: a -> ext is routed through the router; send it through the TUN device
        line = DelayLine(lab.names.router(), TUN_NAME, DELAY_S)
        try:
            delay_to_external(lab, TUN_NAME)
            yield lab
        finally:
            line.close()


@pytest.fixture(autouse=True)
def fresh_truth(request: pytest.FixtureRequest) -> None:
    """Empty the truth sets before each test that uses the lab (its ports repeat across params)."""
    if "lab" in request.fixturenames:
        lab: Lab = request.getfixturevalue("lab")
        for name in ("a", "ext"):
            sets = [f"{s}{f}" for s in ("rst_out", "rst_in", "pk_in") for f in "46"]
            nsu.nft_apply(lab.endpoint(name).netns, "".join(f"flush set inet hl_truth {x}\n" for x in sets))


def ino(lab: Lab, name: str) -> int:
    return os.stat(f"{nsu.NETNS_RUN_DIR}/{lab.endpoint(name).netns}").st_ino


def ip(lab: Lab, name: str, family: int) -> str:
    return str(lab.endpoint(name).ip(family))


# ---- truth ----------------------------------------------------------------------------------------
def nft_set(ns: str, name: str) -> dict[Tuple4, int]:
    """{(saddr, sport, daddr, dport): packets} of one truth set."""
    doc = json.loads(nsu.ns_run(ns, ["nft", "-j", "list", "set", "inet", "hl_truth", name]))
    out: dict[Tuple4, int] = {}
    for item in doc["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            sa, sp, da, dp = e["elem"]["val"]["concat"]
            out[(str(ipaddress.ip_address(sa)), int(sp), str(ipaddress.ip_address(da)), int(dp))] = int(
                e["elem"]["counter"]["packets"]
            )
    return out


def both_families(ns: str, prefix: str) -> dict[Tuple4, int]:
    return {**nft_set(ns, prefix + "4"), **nft_set(ns, prefix + "6")}


def snmp_tcp(ns: str) -> dict[str, int]:
    """The namespace's Tcp MIB (/proc/net/snmp is per network namespace)."""
    lines = [
        ln.split() for ln in nsu.ns_run(ns, ["cat", "/proc/net/snmp"]).splitlines() if ln.startswith("Tcp:")
    ]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}


def tcp_info(s: socket.socket) -> dict[str, int]:
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    names = ["rto", "ato", "snd_mss", "rcv_mss", "unacked", "sacked", "lost", "retrans", "fackets"]
    names += ["last_data_sent", "last_ack_sent", "last_data_recv", "last_ack_recv", "pmtu", "rcv_ssthresh"]
    names += ["rtt", "rttvar", "snd_ssthresh", "snd_cwnd", "advmss", "reordering", "rcv_rtt", "rcv_space"]
    names += ["total_retrans"]
    return dict(zip(names, struct.unpack_from(f"={len(names)}I", raw, 8), strict=True))


def wait_for(cond: Any, what: str, timeout: float = 30.0) -> None:
    """Wait (bounded) for the kernel to reach a state; the assertions after it are exact."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def live_sockets(ns: str, port: int) -> list[str]:
    """States of the sockets in ns using `port` that are not (yet) closed or in TIME_WAIT."""
    out = nsu.ns_run(ns, ["ss", "-Htan", f"( sport = :{port} or dport = :{port} )"])
    return [
        ln.split()[0]
        for ln in out.splitlines()
        if ln.split() and ln.split()[0] not in ("TIME-WAIT", "LISTEN")
    ]


# ---- records ----------------------------------------------------------------------------------------
def records(d: HealthDrain, netns: int) -> dict[Tuple4, SocketHealth]:
    out = {s.tuple4(): s for s in d.sockets if s.netns == netns}
    assert len(out) == len([s for s in d.sockets if s.netns == netns]), "one socket twice in a drain"
    return out


def exact(got: int, truth: int, missed: int, what: str) -> None:
    """got == truth, except for events the kernel reports it skipped (``missed``: a tracepoint hit
    again on a CPU where the program was already running, e.g. from a softirq interrupting it;
    counted machine-wide, so only an upper bound of what this test's sockets lost). With no miss,
    as in almost every run, this is plain equality."""
    assert truth - missed <= got <= truth, (
        f"{what}: recorded {got}, truth {truth}, kernel-skipped events {missed}"
    )


def sock_tuple(s: socket.socket) -> Tuple4:
    la, lp = s.getsockname()[:2]
    ra, rp = s.getpeername()[:2]
    return (str(ipaddress.ip_address(la)), lp, str(ipaddress.ip_address(ra)), rp)


class Pair:
    """A connected client (in pod a) and server (in ext) socket."""

    def __init__(self, lab: Lab, family: int, listener: socket.socket) -> None:
        self.cli = nsu.socket_in(lab.endpoint("a").netns, AF[family], socket.SOCK_STREAM)
        self.cli.settimeout(30)
        self.cli.connect(listener.getsockname()[:2])
        self.srv, _ = listener.accept()
        self.srv.settimeout(30)
        self.cli_t = sock_tuple(self.cli)
        self.srv_t = sock_tuple(self.srv)

    def close(self) -> None:
        self.cli.close()
        self.srv.close()


@contextlib.contextmanager
def listener(lab: Lab, family: int, port: int) -> Iterator[socket.socket]:
    s = nsu.socket_in(lab.endpoint("ext").netns, AF[family], socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip(lab, "ext", family), port))
    s.listen(128)
    s.settimeout(30)
    try:
        yield s
    finally:
        s.close()


# every counting test runs once with the preferred hooks (tp_btf) and once with the fallbacks
# (tp_btf avoided: raw_tp everywhere; for RTT the fentry alternative is tried first and refused here)
@pytest.fixture(params=["tp_btf", "raw_tp"])
def avoid(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return () if request.param == "tp_btf" else ("tp_btf",)


def check_hooks(th: TcpHealth, avoid: tuple[str, ...]) -> None:
    kind = "raw_tp" if avoid else "tp_btf"
    assert th.hooks and all(h.startswith(kind + "/") for h in th.hooks.values()), th.hooks


# ---- probes and lifecycle -------------------------------------------------------------------------------
def test_probe_hooks_reports_every_feature_and_the_fentry_refusal() -> None:
    probes = probe_hooks(exhaustive=True)
    assert [p.name for p in probes] == [f"TCP health: {f}" for f in FEATURES]
    assert all(p.ok for p in probes), probes
    by = {p.name.split(": ")[1]: p.detail for p in probes}
    assert by["retransmits"].startswith("uses tp_btf/tcp_retransmit_skb (")
    assert by["rtt"].startswith("uses tp_btf/tcp_probe (")
    assert "fentry/tcp_rcv_established: load: EPERM" in by["rtt"]  # this VM's kernel forbids fentry
    assert "raw_tp/tcp_probe: also works" in by["rtt"]
    assert by["state"].startswith("uses tp_btf/inet_sock_set_state")


def prog_exists(prog_id: int) -> bool:
    fd = lb.lib().bpf_prog_get_fd_by_id(prog_id)
    if fd >= 0:
        os.close(fd)
    return fd >= 0


def progs_gone(ids: set[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(prog_exists(i) for i in ids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_open_uses_the_preferred_hooks_and_close_detaches() -> None:
    th = TcpHealth()
    assert th.hooks == {
        "retransmits": "tp_btf/tcp_retransmit_skb",
        "rtt": "tp_btf/tcp_probe",
        "resets": "tp_btf/tcp_send_reset + tp_btf/tcp_receive_reset",
        "state": "tp_btf/inet_sock_set_state",
    }
    ids = th.prog_ids
    assert len(ids) == 5 and all(prog_exists(i) for i in ids)
    th.close()
    th.close()  # idempotent
    assert progs_gone(ids)
    with pytest.raises(Exception, match="closed"):
        th.drain()


def test_only_the_requested_features_load_and_avoided_kinds_are_skipped() -> None:
    with TcpHealth(features=["state"]) as th:
        assert list(th.hooks) == ["state"] and len(th.prog_ids) == 1
    with TcpHealth(features=["rtt"], avoid=["tp_btf"]) as th:
        assert th.hooks == {"rtt": "raw_tp/tcp_probe"}
        [p] = th.probes
        assert p.ok and "tp_btf/tcp_probe: avoided" in p.detail
        assert "fentry/tcp_rcv_established: load: EPERM" in p.detail  # probed, refused, skipped
    with pytest.raises(EbpfError, match="TCP health: state unavailable"):
        TcpHealth(features=["state"], require=["state"], avoid=["tp_btf", "raw_tp"])
    with pytest.raises(ValueError, match="feature 'nope'"):
        TcpHealth(features=["nope"])
    with pytest.raises(ValueError, match="hook kind 'kprobe'"):
        TcpHealth(avoid=["kprobe"])


SIGTERM_CHILD = r"""
import os, signal, sys, time
from otelflow.ebpf.health import TcpHealth
from otelflow.ebpf.loader import close_on_signals
from otelflow.ebpf import libbpf as lb
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))  # keeps the process alive after cleanup
th = TcpHealth()
close_on_signals(th)
ids = sorted(th.prog_ids)
print(" ".join(map(str, ids)), flush=True)
while not got:
    time.sleep(0.05)
def alive():
    out = []
    for i in ids:
        fd = lb.lib().bpf_prog_get_fd_by_id(i)
        if fd >= 0:
            out.append(i); os.close(fd)
    return out
deadline = time.monotonic() + 10  # a detached program is freed after an RCU grace period
while alive() and time.monotonic() < deadline:
    time.sleep(0.05)
print("closed" if th.closed else "open", len(alive()), flush=True)
"""


def test_sigterm_detaches() -> None:
    p = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        ids = {int(x) for x in p.stdout.readline().split()}
        assert len(ids) == 5
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    state, alive = out.split()
    assert (state, alive) == ("closed", "0")  # the handler closed it before the previous handler ran
    assert progs_gone(ids)


# ---- open / close -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [4, 6])
def test_opened_and_closed_are_exact_per_socket_and_match_the_mib(
    lab: Lab, family: int, avoid: tuple[str, ...]
) -> None:
    n, port = 6, 7100 + family
    a, ext = lab.endpoint("a").netns, lab.endpoint("ext").netns
    before = {"a": snmp_tcp(a), "ext": snmp_tcp(ext)}
    with TcpHealth(features=["state"], avoid=avoid) as th, listener(lab, family, port) as lst:
        check_hooks(th, avoid)
        th.drain()
        pairs = [Pair(lab, family, lst) for _ in range(n)]
        for p in pairs:
            p.cli.sendall(b"hello")
            assert p.srv.recv(5) == b"hello"
            p.close()  # client first (active close), then the server
        wait_for(
            lambda: not live_sockets(a, port) and not live_sockets(ext, port), "the connections to close"
        )
        d = th.drain()
    after = {"a": snmp_tcp(a), "ext": snmp_tcp(ext)}
    ra, rx = records(d, ino(lab, "a")), records(d, ino(lab, "ext"))
    missed = d.missed["state"]
    for p in pairs:
        for recs, t in ((ra, p.cli_t), (rx, p.srv_t)):
            r = recs.get(t)
            if missed == 0 or r is not None:
                assert r is not None, t
                exact(r.opened, 1, missed, f"{t} opened")
                exact(r.closed, 1, missed, f"{t} closed")
                assert r.failed == 0 and r.family == family
                assert r.last_state == TCP_CLOSE or missed
    # nothing else in the lab's namespaces changed state, and the kernel's MIB agrees
    assert set(ra) <= {p.cli_t for p in pairs} and set(rx) <= {p.srv_t for p in pairs}
    assert after["a"]["ActiveOpens"] - before["a"]["ActiveOpens"] == n
    assert after["ext"]["PassiveOpens"] - before["ext"]["PassiveOpens"] == n
    exact(sum(r.opened for r in ra.values()), n, missed, "client opens vs ActiveOpens")
    exact(sum(r.opened for r in rx.values()), n, missed, "server opens vs PassiveOpens")
    for side in ("a", "ext"):
        assert after[side]["AttemptFails"] == before[side]["AttemptFails"]
        assert after[side]["CurrEstab"] == 0
    assert all(v == 0 for v in d.drops.values()), d.drops


def test_a_dual_stack_socket_talking_ipv4_is_recorded_as_ipv4(lab: Lab) -> None:
    port = 7150
    a = lab.endpoint("a").netns
    with TcpHealth(features=["state"]) as th, listener(lab, 4, port) as lst:
        th.drain()
        c = nsu.socket_in(a, socket.AF_INET6, socket.SOCK_STREAM)
        c.settimeout(30)
        c.connect((f"::ffff:{ip(lab, 'ext', 4)}", port))
        srv, _ = lst.accept()
        la, lp = c.getsockname()[:2]
        assert la == f"::ffff:{ip(lab, 'a', 4)}"
        c.close()
        srv.close()
        wait_for(lambda: not live_sockets(a, port), "the connection to close")
        d = th.drain()
    r = records(d, ino(lab, "a"))[(ip(lab, "a", 4), lp, ip(lab, "ext", 4), port)]
    assert (r.family, r.opened, r.closed) == (4, 1, 1)
    assert r.laddr == b"\0" * 10 + b"\xff\xff" + socket.inet_aton(ip(lab, "a", 4))


def test_the_netns_filter_records_only_listed_namespaces_and_can_change(lab: Lab) -> None:
    port = 7160
    a, ext = lab.endpoint("a").netns, lab.endpoint("ext").netns

    def one_connection(th: TcpHealth) -> tuple[Pair, HealthDrain]:
        with listener(lab, 4, port) as lst:
            p = Pair(lab, 4, lst)
            p.close()
        wait_for(lambda: not live_sockets(a, port) and not live_sockets(ext, port), "the connection to close")
        return p, th.drain()

    with TcpHealth(features=["state"], netns_filter=[ino(lab, "a")]) as th:
        th.drain()
        p, d = one_connection(th)
        assert records(d, ino(lab, "a"))[p.cli_t].opened == 1
        assert records(d, ino(lab, "ext")) == {}  # not listed: not recorded...
        assert d.stats["netns_filtered"] >= 2  # ...but counted (the server's open and close at least)
        th.set_netns_filter([ino(lab, "ext")])
        p, d = one_connection(th)
        assert records(d, ino(lab, "a")) == {} and records(d, ino(lab, "ext"))[p.srv_t].closed == 1
        th.set_netns_filter(None)
        p, d = one_connection(th)
        assert records(d, ino(lab, "a"))[p.cli_t].opened == records(d, ino(lab, "ext"))[p.srv_t].opened == 1
        with pytest.raises(ValueError, match="out of range"):
            th.set_netns_filter([0])


# ---- resets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [4, 6])
def test_resets_to_a_closed_port_match_nftables_per_socket(
    lab: Lab, family: int, avoid: tuple[str, ...]
) -> None:
    n, closed_port = 5, 7200 + family
    a, ext = lab.endpoint("a").netns, lab.endpoint("ext").netns
    before = {"a": snmp_tcp(a), "ext": snmp_tcp(ext)}
    with TcpHealth(features=["resets", "state"], avoid=avoid) as th:
        check_hooks(th, avoid)
        th.drain()
        for _ in range(n):
            c = nsu.socket_in(a, AF[family], socket.SOCK_STREAM)
            c.settimeout(30)
            with pytest.raises(ConnectionRefusedError):
                c.connect((ip(lab, "ext", family), closed_port))
            c.close()
        d = th.drain()
    after = {"a": snmp_tcp(a), "ext": snmp_tcp(ext)}
    sent = {k: v for k, v in both_families(ext, "rst_out").items() if k[1] == closed_port}
    recv = {k: v for k, v in both_families(a, "rst_in").items() if k[1] == closed_port}
    assert len(sent) == len(recv) == n
    # the server side has no socket: keyed by the packet's tuple, as the closed port "sees" it
    rx = {t: r for t, r in records(d, ino(lab, "ext")).items() if t[1] == closed_port}
    ra = {t: r for t, r in records(d, ino(lab, "a")).items() if t[3] == closed_port}
    m_rst, m_state = d.missed["resets"], d.missed["state"]
    for k, v in sent.items():
        r = rx.get(k)
        exact(r.resets_sent if r else 0, v, m_rst, f"{k} resets sent")
    for k, v in recv.items():
        r = ra.get((k[2], k[3], k[0], k[1]))
        exact(r.resets_received if r else 0, v, m_rst, f"{k} resets received")
        exact(r.failed if r else 0, 1, m_state, f"{k} failed")
        assert r is None or (r.opened, r.closed) == (0, 0)
    assert set(rx) <= set(sent) and {(t[2], t[3], t[0], t[1]) for t in ra} <= set(recv)
    fails = after["a"]["AttemptFails"] - before["a"]["AttemptFails"]
    exact(sum(r.failed for r in ra.values()), fails, m_state, "failed vs AttemptFails")
    rsts = after["ext"]["OutRsts"] - before["ext"]["OutRsts"]
    exact(sum(r.resets_sent for r in rx.values()), rsts, m_rst, "resets sent vs OutRsts")
    assert d.stats["reset_from_skb"] >= n and d.drops["resets_sent"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_linger_zero_close_resets_match_nftables_per_socket(
    lab: Lab, family: int, avoid: tuple[str, ...]
) -> None:
    m, port = 4, 7300 + family
    a, ext = lab.endpoint("a").netns, lab.endpoint("ext").netns
    with TcpHealth(features=["resets", "state"], avoid=avoid) as th, listener(lab, family, port) as lst:
        check_hooks(th, avoid)
        th.drain()
        pairs = [Pair(lab, family, lst) for _ in range(m)]
        for p in pairs:
            p.cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            p.cli.close()  # abortive close: RST instead of FIN
        wait_for(
            lambda: len([k for k in both_families(ext, "rst_in") if k[3] == port]) == m, "the RSTs to arrive"
        )
        d = th.drain()
        for p in pairs:
            p.srv.close()
    out_a = {k: v for k, v in both_families(a, "rst_out").items() if k[3] == port}
    in_x = {k: v for k, v in both_families(ext, "rst_in").items() if k[3] == port}
    ra, rx = records(d, ino(lab, "a")), records(d, ino(lab, "ext"))
    m_rst, m_state = d.missed["resets"], d.missed["state"]
    zero = SocketHealth(b"", b"", 0, 0, 0, 0, *([0] * 13))
    for p in pairs:
        c, s = ra.get(p.cli_t, zero), rx.get(p.srv_t, zero)
        assert out_a[p.cli_t] == in_x[(p.srv_t[2], p.srv_t[3], p.srv_t[0], p.srv_t[1])] == 1
        exact(c.resets_sent, 1, m_rst, f"{p.cli_t} resets sent")
        exact(s.resets_received, 1, m_rst, f"{p.srv_t} resets received")
        for what, got in (("client opened", c.opened), ("client closed", c.closed)):
            exact(got, 1, m_state, what)
        for what, got in (("server opened", s.opened), ("server closed", s.closed)):
            exact(got, 1, m_state, what)
        assert c.resets_received == 0 and s.resets_sent == 0


# ---- retransmits --------------------------------------------------------------------------------------
LOSS = """
table inet hl_loss {{
  counter dropped {{ }}
  chain in {{
    type filter hook input priority -300; policy accept;
    tcp dport {port} meta length > 200 numgen random mod 20 == 0 counter name "dropped" drop
  }}
}}
"""


@pytest.mark.parametrize("family", [4, 6])
def test_retransmitted_segments_equal_tcpi_total_retrans(
    lab: Lab, family: int, avoid: tuple[str, ...]
) -> None:
    port, nbytes = 7400 + family, 3_000_000
    ext = lab.endpoint("ext").netns
    nsu.nft_apply(ext, LOSS.format(port=port))  # the receiver drops 5% of the data segments
    try:
        with TcpHealth(features=["retransmits"], avoid=avoid) as th, listener(lab, family, port) as lst:
            check_hooks(th, avoid)
            th.drain()
            p = Pair(lab, family, lst)
            got = bytearray()

            def read() -> None:
                while len(got) < nbytes:
                    chunk = p.srv.recv(1 << 16)
                    if not chunk:
                        return
                    got.extend(chunk)

            reader = threading.Thread(target=read)
            reader.start()
            p.cli.sendall(b"r" * nbytes)
            reader.join(timeout=120)
            assert len(got) == nbytes
            wait_for(lambda: tcp_info(p.cli)["unacked"] == 0, "every segment to be acknowledged")
            info = tcp_info(p.cli)
            d = th.drain()
            dropped = json.loads(
                nsu.ns_run(ext, ["nft", "-j", "list", "counter", "inet", "hl_loss", "dropped"])
            )
            nsu.ns_run(ext, ["nft", "delete", "table", "inet", "hl_loss"])
            p.close()
    finally:
        nsu.ns_run(ext, ["nft", "delete", "table", "inet", "hl_loss"], check=False)
    n_dropped = next(i["counter"]["packets"] for i in dropped["nftables"] if "counter" in i)
    assert n_dropped > 0, "the loss rule dropped nothing: no retransmission to count"
    c = records(d, ino(lab, "a"))[p.cli_t]
    why = (
        f"{c}, TCP_INFO {info}, dropped {n_dropped}, missed {d.missed}, drops {d.drops}, stats {d.stats}, "
        f"all in a: {list(records(d, ino(lab, 'a')).values())}"
    )
    # (offloads off: every retransmission is one segment, so one skipped event is one segment)
    assert c.retrans_failed == 0, why
    exact(c.retrans_segs, info["total_retrans"], d.missed["retransmits"], why)
    assert info["total_retrans"] >= n_dropped  # every dropped segment was sent again
    assert p.srv_t not in records(d, ino(lab, "ext"))  # the receiver retransmitted nothing
    assert all(v == 0 for v in d.drops.values())


# ---- RTT ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [4, 6])
def test_rtt_samples_and_srtt_match_tcp_info_with_a_known_delay(
    lab: Lab, family: int, avoid: tuple[str, ...]
) -> None:
    port, rounds = 7500 + family, 12
    a = lab.endpoint("a").netns
    with TcpHealth(features=["rtt"], avoid=avoid) as th, listener(lab, family, port) as lst:
        check_hooks(th, avoid)
        th.drain()
        p = Pair(lab, family, lst)
        for _ in range(rounds):
            p.cli.sendall(b"q" * 100)
            assert p.srv.recv(100, socket.MSG_WAITALL) == b"q" * 100
            p.srv.sendall(b"a" * 100)
            assert p.cli.recv(100, socket.MSG_WAITALL) == b"a" * 100
        # a last segment that acknowledges nothing new: the client samples its final srtt on it
        p.srv.sendall(b"z")
        assert p.cli.recv(1) == b"z"
        # quiescent: nothing unacknowledged either way, so no segment can reach the client any more
        wait_for(lambda: tcp_info(p.srv)["unacked"] == tcp_info(p.cli)["unacked"] == 0, "the last ACK")
        info = tcp_info(p.cli)
        d = th.drain()
        received = both_families(a, "pk_in")[(p.cli_t[2], p.cli_t[3], p.cli_t[0], p.cli_t[1])]
        p.close()
    c = records(d, ino(lab, "a"))[p.cli_t]
    assert c.srtt_us == info["rtt"] or d.missed["rtt"]  # the kernel's smoothed RTT, as TCP_INFO has it
    # every segment but the SYN-ACK arrived in ESTABLISHED
    exact(c.rtt_samples, received - 1, d.missed["rtt"], "RTT samples vs segments received")
    assert c.rtt_min_us >= DELAY_S * 1_000_000  # the delay line's 20 ms are in every sample
    assert c.rtt_min_us <= c.rtt_sum_us // c.rtt_samples
    s = records(d, ino(lab, "ext"))[p.srv_t]
    assert s.rtt_samples > 0 and s.rtt_min_us >= DELAY_S * 1_000_000


# ---- a tiny map --------------------------------------------------------------------------------------------
def test_a_full_map_counts_what_it_could_not_record(lab: Lab) -> None:
    n, port = 8, 7600
    a, ext = lab.endpoint("a").netns, lab.endpoint("ext").netns
    with TcpHealth(features=["state"], max_entries=3, netns_filter=[ino(lab, "a"), ino(lab, "ext")]) as th:
        th.drain()
        with listener(lab, 4, port) as lst:
            pairs = [Pair(lab, 4, lst) for _ in range(n)]
            for p in pairs:
                p.close()
            wait_for(
                lambda: not live_sockets(a, port) and not live_sockets(ext, port), "the connections to close"
            )
        d = th.drain()
    assert len(d.sockets) == 3
    assert sum(s.opened for s in d.sockets) + d.drops["opened"] == 2 * n
    assert sum(s.closed for s in d.sockets) + d.drops["closed"] == 2 * n
    assert d.drops["opened"] > 0 and d.drops["failed"] == 0
    assert d.stats["insert_error"] == 0 and d.stats["no_map"] == 0
    assert set(d.drops) == set(DROP_NAMES) and set(d.stats) == set(STAT_NAMES)
    # the allow-list kept the rest of the machine out of the map
    assert {s.netns for s in d.sockets} <= {ino(lab, "a"), ino(lab, "ext")}
