"""Kernel tests for otelflow.conntrack.netlink against real conntrack tables (root only).

Builds its own throwaway lab: a client and a server network namespace (``oflct-<hex>-c`` and
``oflct-<hex>-s``) joined by a veth, 10.250.0.0/24 and fd00:250::/64. Only the client namespace
runs a conntrack-using ruleset (and the per-flow nft counters the byte counts are checked against),
with ``nf_conntrack_acct=1`` and ``nf_conntrack_timestamp=1`` set before any traffic. All traffic
stays between the two namespaces; dumps and event sockets run inside the client namespace through
``ip netns exec``; the machine's own conntrack table is never read or touched. Namespaces and every
process started here are removed in fixture finalizers, failures included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="kernel test: needs root to create network namespaces"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ip", "nft", "conntrack")),
        reason="kernel test: needs ip (iproute2), nft and conntrack (apt-get install conntrack)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
C4, S4, VIP4 = "10.250.0.1", "10.250.0.2", "10.250.0.99"
C6, S6 = "fd00:250::1", "fd00:250::2"

# name -> (family, proto, client port, server address, server port[, address the client dials])
FLOWS: dict[str, tuple[Any, ...]] = {
    "tcp4": (4, "tcp", 41001, S4, 5001),
    "udp4": (4, "udp", 41002, S4, 5002),
    "tcp6": (6, "tcp", 41003, S6, 5003),
    "udp6": (6, "udp", 41004, S6, 5004),
    "udp4-mark": (4, "udp", 41005, S4, 5005),
    "udp4-zone": (4, "udp", 41006, S4, 5006),
    "tcp4-dnat": (4, "tcp", 41007, S4, 5007, VIP4),
}
TCP_SEND, TCP_BACK, UDP_DGRAMS, UDP_SIZE = 300_000, 120_000, 5, 700


def sh(*cmd: str, check: bool = True, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout, **kw)


def ruleset() -> str:
    """The client namespace's ruleset: conntrack users, zone/mark/DNAT setters, one counter per flow
    and direction (same hooks as conntrack's own accounting: output for orig, input for reply)."""
    out_rules = "\n".join(
        f'    {p} sport {cp} counter comment "{n}-orig"' for n, (_f, p, cp, *_r) in FLOWS.items()
    )
    in_rules = "\n".join(
        f'    {p} dport {cp} counter comment "{n}-reply"' for n, (_f, p, cp, *_r) in FLOWS.items()
    )
    return (
        textwrap.dedent(
            """
        table inet oflct {
          chain raw_out {
            type filter hook output priority -300;
            udp dport 5006 ct zone set 7
          }
          chain raw_pre {
            type filter hook prerouting priority -300;
            udp sport 5006 ct zone set 7
          }
          chain nat_out {
            type nat hook output priority -100;
            ip daddr 10.250.0.99 tcp dport 80 dnat ip to 10.250.0.2:5007
          }
          chain out {
            type filter hook output priority 0;
            ct state new counter
            udp dport 5005 ct mark set 42
        OUT_RULES
          }
          chain in {
            type filter hook input priority 0;
        IN_RULES
          }
        }
        """
        )
        .replace("OUT_RULES", out_rules)
        .replace("IN_RULES", in_rules)
    )


SERVER = r"""
import socket, sys, threading
def tcp(fam, addr, port, back):
    ls = socket.socket(fam, socket.SOCK_STREAM); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port)); ls.listen(16)
    def serve(c):
        while c.recv(65536):
            pass
        c.sendall(b"r" * back); c.close()
    def loop():
        while True:
            c, _ = ls.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
def udp(fam, addr, port):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((addr, port))
    def loop():
        while True:
            d, a = s.recvfrom(65536); s.sendto(d, a)
    threading.Thread(target=loop, daemon=True).start()
A4, A6 = socket.AF_INET, socket.AF_INET6
back = int(sys.argv[1])
tcp(A4, "10.250.0.2", 5001, back); tcp(A6, "fd00:250::2", 5003, back); tcp(A4, "10.250.0.2", 5007, back)
for fam, addr, port in [(A4, "10.250.0.2", 5002), (A6, "fd00:250::2", 5004), (A4, "10.250.0.2", 5005),
                        (A4, "10.250.0.2", 5006), (A4, "10.250.0.2", 5010)]:
    udp(fam, addr, port)
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import json, socket, sys
flows, tcp_send, dgrams, size = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
got = {}
for name, f in flows.items():
    fam = socket.AF_INET if f[0] == 4 else socket.AF_INET6
    cport, dst = f[2], (f[5] if len(f) > 5 else f[3])
    local = "10.250.0.1" if f[0] == 4 else "fd00:250::1"
    if f[1] == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((local, cport)); s.settimeout(10)
        s.connect((dst, 80 if len(f) > 5 else f[4])); s.sendall(b"s" * tcp_send); s.shutdown(socket.SHUT_WR)
        n = 0
        while True:
            d = s.recv(65536)
            if not d:
                break
            n += len(d)
        s.close(); got[name] = n
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((local, cport)); s.settimeout(5)
        n = 0
        for _ in range(dgrams):
            s.sendto(b"u" * size, (dst, f[4])); n += len(s.recv(65536))
        s.close(); got[name] = n
print(json.dumps(got))
"""

DUMP = r"""
import json, socket
from otelflow.conntrack.netlink import ParseStats, dump
st = ParseStats()
def tup(t):
    return {"src": t.src_str, "dst": t.dst_str, "proto": t.proto, "sport": t.sport, "dport": t.dport,
            "icmp": [t.icmp_id, t.icmp_type, t.icmp_code]}
out = []
for e in dump(stats=st):
    d = {k: getattr(e, k) for k in ("family", "id", "zone", "mark", "status", "timeout", "tcp_state",
         "orig_packets", "orig_bytes", "reply_packets", "reply_bytes", "start", "stop", "use")}
    d.update(orig=tup(e.orig), reply=tup(e.reply), state=e.tcp_state_name, assured=e.assured, dnat=e.dnat,
             snat=e.snat, confirmed=e.confirmed)
    out.append(d)
print(json.dumps({"stats": {k: getattr(st, k) for k in st.__slots__}, "entries": out}))
"""

EVENTS = r"""
import json, select, socket, subprocess, sys, time
from otelflow.conntrack.netlink import EventSocket, dump

def ev(e):
    t = e.entry
    return {"kind": e.kind, "sport": t.orig.sport, "dport": t.orig.dport, "proto": t.orig.proto, "id": t.id,
            "orig_packets": t.orig_packets, "orig_bytes": t.orig_bytes, "reply_packets": t.reply_packets,
            "reply_bytes": t.reply_bytes, "timeout": t.timeout, "status": t.status, "stop": t.stop,
            "start": t.start}

def wait_for(es, pred, secs=10.0):
    got, deadline = [], time.monotonic() + secs
    while time.monotonic() < deadline:
        select.select([es.fileno()], [], [], 0.2)
        got += es.read_events()
        if any(pred(e) for e in got):
            break
    return got

def udp_once(port, dport=5010):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("10.250.0.1", port)); s.settimeout(5)
    s.sendto(b"e" * 100, ("10.250.0.2", dport)); s.recv(1000); s.close()

res = {}
with EventSocket() as es:
    res["rcvbuf"] = es.rcvbuf
    t0 = time.time()
    udp_once(41020)
    got = wait_for(es, lambda e: e.kind == "new" and e.entry.orig.sport == 41020)
    res["new_latency_s"] = time.time() - t0
    subprocess.run(["conntrack", "-D", "-p", "udp", "--orig-port-src", "41020"], check=True,
                   capture_output=True)
    t0 = time.time()
    got += wait_for(es, lambda e: e.kind == "destroy" and e.entry.orig.sport == 41020)
    res["destroy_latency_s"] = time.time() - t0
    res["events"] = [ev(e) for e in got]
    res["overflows"] = es.overflows

with EventSocket(rcvbuf=4096) as small:
    res["small_rcvbuf"] = small.rcvbuf
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("10.250.0.1", 41030))
    n = int(sys.argv[1])
    for i in range(n):
        s.sendto(b"b", ("10.250.0.2", 20000 + i))
    s.close()
    evs = small.read_events(max_msgs=100000)
    res["burst_first_read"] = len(evs)
    total = len(evs)
    for _ in range(200):
        more = small.read_events(max_msgs=100000)
        if not more and small.overflows:
            break
        total += len(more)
    res["burst_total_read"] = total
    res["burst_overflows"] = small.overflows
    res["burst_needs_resync"] = small.needs_resync
    res["burst_dump_entries"] = sum(1 for e in dump() if e.orig.sport == 41030)
print(json.dumps(res))
"""


@dataclass
class Lab:
    client: str
    server: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def run_py(self, code: str, *args: str, timeout: float = 120) -> Any:
        """Run Python inside the client namespace; return its JSON output."""
        r = sh("ip", "netns", "exec", self.client, PY, "-c", code, *args, timeout=timeout, cwd=str(REPO))
        return json.loads(r.stdout)

    def conntrack_list(self) -> list[dict[str, Any]]:
        r = sh("ip", "netns", "exec", self.client, "conntrack", "-L", "-o", "extended,id")
        return [parse_conntrack_line(ln) for ln in r.stdout.splitlines() if ln.strip()]

    def nft_counters(self) -> dict[str, tuple[int, int]]:
        r = sh("ip", "netns", "exec", self.client, "nft", "-j", "list", "table", "inet", "oflct")
        out: dict[str, tuple[int, int]] = {}
        for item in json.loads(r.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for ex in rule["expr"]:
                if "counter" in ex:
                    out[rule["comment"]] = (ex["counter"]["packets"], ex["counter"]["bytes"])
        return out


def _cleanup(lab: Lab) -> None:
    for p in lab.procs:
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
    for ns in (lab.client, lab.server):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    prefix = f"oflct-{secrets.token_hex(3)}"
    lab = Lab(client=f"{prefix}-c", server=f"{prefix}-s")
    try:
        for ns in (lab.client, lab.server):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "-n",
            lab.client,
            "link",
            "add",
            "v0",
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            lab.server,
        )
        for ns, dev, a4, a6 in ((lab.client, "v0", C4, C6), (lab.server, "v1", S4, S6)):
            sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # Accounting and timestamps must be on before the first packet (entries keep their extensions).
        sh(
            "ip", "netns", "exec", lab.client, "sysctl", "-qw",
            "net.netfilter.nf_conntrack_acct=1",
            "net.netfilter.nf_conntrack_timestamp=1",
            "net.netfilter.nf_conntrack_udp_timeout=600",
            "net.netfilter.nf_conntrack_udp_timeout_stream=600",
        )  # fmt: skip
        sh("ip", "netns", "exec", lab.client, "nft", "-f", "-", input=ruleset())
        server = subprocess.Popen(
            ["ip", "netns", "exec", lab.server, PY, "-c", SERVER, str(TCP_BACK)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        lab.procs.append(server)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        yield lab
    finally:
        _cleanup(lab)
        left = sh("ip", "netns", "list").stdout
        assert lab.client not in left and lab.server not in left


@pytest.fixture(scope="module")
def traffic(lab: Lab) -> dict[str, int]:
    got = lab.run_py(CLIENT, json.dumps(FLOWS), str(TCP_SEND), str(UDP_DGRAMS), str(UDP_SIZE))
    assert got["tcp4"] == got["tcp6"] == got["tcp4-dnat"] == TCP_BACK
    assert got["udp4"] == UDP_DGRAMS * UDP_SIZE
    time.sleep(1.0)  # let the last ACKs land before counters are compared
    return got


_KV = re.compile(r"([\w-]+)=(\S+)")
_TUPLE_KEYS = frozenset({"src", "dst", "sport", "dport", "packets", "bytes", "type", "code"})


def parse_conntrack_line(line: str) -> dict[str, Any]:
    """Parse one `conntrack -L -o extended,id` line: orig/reply tuples, state, [FLAGS], key=values.

    ``id=`` inside a tuple is the ICMP id; the conntrack id is the one after ``use=``.
    """
    toks = line.split()
    d: dict[str, Any] = {"l3": toks[0], "proto": int(toks[3]), "timeout": int(toks[4]), "flags": set()}
    rest = toks[5:]
    if rest and not _KV.fullmatch(rest[0]) and not rest[0].startswith("["):
        d["state"] = rest.pop(0)
    tuples: list[dict[str, str]] = [{}, {}]
    which = -1
    for tok in rest:
        if tok.startswith("["):
            d["flags"].add(tok.strip("[]"))
            continue
        m = _KV.fullmatch(tok)
        if not m:
            continue
        k, v = m.groups()
        if k == "src":
            which += 1
        if 0 <= which <= 1 and (k in _TUPLE_KEYS or (k == "id" and "use" not in d)):
            tuples[which][k] = v
        else:
            d[k] = v
    d["orig"], d["reply"] = tuples
    return d


def _canon(addr: str) -> str:
    import ipaddress

    return str(ipaddress.ip_address(addr))


def _flow_of(entry: dict[str, Any], cport: int) -> bool:
    return entry["orig"]["sport"] == cport and entry["orig"]["proto"] in (6, 17)


def test_dump_matches_conntrack_cli(lab: Lab, traffic: dict[str, int]) -> None:
    ours = lab.run_py(DUMP)
    theirs = lab.conntrack_list()
    stats = ours["stats"]
    assert stats["malformed"] == 0 and stats["internal_errors"] == 0
    assert stats["entries"] == len(ours["entries"])
    by_id = {e["id"]: e for e in ours["entries"]}
    assert len(by_id) == len(ours["entries"]), "ids must be unique"
    assert {int(t["id"]) for t in theirs} == set(by_id), "same set of entries (by CTA_ID)"
    for t in theirs:
        o = by_id[int(t["id"])]
        for side in ("orig", "reply"):
            ot, tt = o[side], t[side]
            assert ot["src"] == _canon(tt["src"]) and ot["dst"] == _canon(tt["dst"])
            assert ot["proto"] == t["proto"]
            assert ot["sport"] == int(tt.get("sport", 0)) and ot["dport"] == int(tt.get("dport", 0))
        assert (o["orig_packets"], o["orig_bytes"]) == (int(t["orig"]["packets"]), int(t["orig"]["bytes"]))
        assert (o["reply_packets"], o["reply_bytes"]) == (
            int(t["reply"]["packets"]),
            int(t["reply"]["bytes"]),
        )
        assert o["mark"] == int(t.get("mark", 0))
        assert o["zone"] == int(t.get("zone", 0))
        assert o["use"] == int(t["use"])
        assert o["state"] == t.get("state")
        assert o["assured"] == ("ASSURED" in t["flags"])
        assert bool(o["status"] & 0x2) == ("UNREPLIED" not in t["flags"])  # IPS_SEEN_REPLY
        assert abs(o["timeout"] - t["timeout"]) <= 3
        assert o["family"] == (2 if t["l3"] == "ipv4" else 10)
        assert o["start"] is not None and o["stop"] is None  # nf_conntrack_timestamp=1


def test_every_lab_flow_present_with_expected_attributes(lab: Lab, traffic: dict[str, int]) -> None:
    entries = lab.run_py(DUMP)["entries"]
    for name, (fam, proto, cport, saddr, sport, *vip) in FLOWS.items():
        [e] = [x for x in entries if _flow_of(x, cport)]
        assert e["family"] == (2 if fam == 4 else 10), name
        assert e["orig"]["dport"] == (80 if vip else sport)
        assert e["orig"]["dst"] == (vip[0] if vip else saddr)
        assert e["reply"]["src"] == saddr and e["reply"]["sport"] == sport
        assert e["confirmed"] and e["status"] & 0x2  # IPS_SEEN_REPLY
        # UDP is only ASSURED once it is still active 2 s after the first reply (nf_conntrack_proto_udp.c)
        assert e["assured"] == (proto == "tcp"), name
        if proto == "tcp":
            assert e["tcp_state"] is not None and e["state"] in ("TIME_WAIT", "CLOSE", "LAST_ACK", "FIN_WAIT")
        else:
            assert e["tcp_state"] is None
        assert e["dnat"] == bool(vip) and not e["snat"]
        assert e["mark"] == (42 if name == "udp4-mark" else 0)
        assert e["zone"] == (7 if name == "udp4-zone" else 0)
        if proto == "udp":
            assert e["orig_packets"] == e["reply_packets"] == UDP_DGRAMS


def test_byte_counters_equal_nft_counters(lab: Lab, traffic: dict[str, int]) -> None:
    entries = lab.run_py(DUMP)["entries"]
    nft = lab.nft_counters()
    for name, (_fam, _proto, cport, *_rest) in FLOWS.items():
        [e] = [x for x in entries if _flow_of(x, cport)]
        assert (e["orig_packets"], e["orig_bytes"]) == nft[f"{name}-orig"], name
        assert (e["reply_packets"], e["reply_bytes"]) == nft[f"{name}-reply"], name
    # sanity: the TCP flows really carried the payload (L3 bytes >= payload)
    [t4] = [x for x in entries if _flow_of(x, 41001)]
    assert t4["orig_bytes"] >= TCP_SEND and t4["reply_bytes"] >= TCP_BACK


def test_ipv4_only_and_ipv6_only_dumps(lab: Lab, traffic: dict[str, int]) -> None:
    code = (
        "import json, socket\nfrom otelflow.conntrack.netlink import dump\n"
        "print(json.dumps([[e.family for e in dump(socket.AF_INET)],"
        " [e.family for e in dump(socket.AF_INET6)], len(dump())]))"
    )
    only4, only6, both = lab.run_py(code)
    assert only4 and set(only4) == {2}
    assert only6 and set(only6) == {10}
    assert len(only4) + len(only6) == both


def test_events_new_destroy_and_overflow(lab: Lab, traffic: dict[str, int]) -> None:
    res = lab.run_py(EVENTS, "3000", timeout=180)
    events = [e for e in res["events"] if e["sport"] == 41020]
    kinds = [e["kind"] for e in events]
    assert "new" in kinds and "destroy" in kinds, res
    assert kinds.index("new") < kinds.index("destroy")
    new = events[kinds.index("new")]
    assert new["dport"] == 5010 and new["proto"] == 17 and new["timeout"] is not None
    destroy = events[kinds.index("destroy")]
    # the DESTROY event carries the final counters: one 100-byte datagram (128 bytes at L3) each way
    assert (destroy["orig_packets"], destroy["orig_bytes"]) == (1, 128)
    assert (destroy["reply_packets"], destroy["reply_bytes"]) == (1, 128)
    assert destroy["id"] == new["id"]
    assert destroy["status"] & 0x200  # IPS_DYING
    assert destroy["stop"] is not None and destroy["start"] is not None  # nf_conntrack_timestamp=1
    assert destroy["stop"] >= destroy["start"]
    assert res["destroy_latency_s"] < 5
    assert res["overflows"] == 0
    assert res["rcvbuf"] >= 8 << 20  # SO_RCVBUFFORCE as root (the kernel doubles the value)
    # tiny buffer + a burst of 3000 new flows: the kernel drops events and tells us (ENOBUFS)
    assert res["burst_overflows"] > 0 and res["burst_needs_resync"]
    assert res["burst_total_read"] < 3000
    assert res["burst_dump_entries"] == 3000  # what a resync dump would recover


OLDER_THAN_LISTENER = r"""
import json, socket, subprocess, time
from otelflow.conntrack.netlink import EventSocket
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("10.250.0.1", port)); s.settimeout(5)
    s.sendto(b"e" * 100, ("10.250.0.2", 5010)); s.recv(1000); s.close()
udp(41050)  # created while nobody listens
with EventSocket(groups=7) as es:  # NEW | UPDATE | DESTROY
    udp(41051)
    time.sleep(0.2)
    for p in (41050, 41051):
        subprocess.run(["conntrack", "-D", "-p", "udp", "--orig-port-src", str(p)], check=True,
                       capture_output=True)
    time.sleep(0.5)
    print(json.dumps([(e.kind, e.entry.orig.sport) for e in es.read_events()]))
"""


def test_entries_created_after_the_listener_report_every_event(lab: Lab, traffic: dict[str, int]) -> None:
    """An entry created while a listener exists reports NEW, UPDATE and DESTROY. (Whether an entry
    older than every listener reports its DESTROY depends on the kernel's event extension, seen both
    ways here; the tracker handles both, so nothing is asserted about it.)"""
    events = [tuple(e) for e in lab.run_py(OLDER_THAN_LISTENER)]
    assert ("new", 41051) in events and ("update", 41051) in events and ("destroy", 41051) in events
