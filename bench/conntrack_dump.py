#!/usr/bin/env python3
"""Benchmark: otelflow's ctnetlink dump+parse vs `conntrack -L -o extended` + a regex parser.

Run as root: ``python bench/conntrack_dump.py [--entries 100000] [--rounds 5]``.

What it does, all inside one throwaway network namespace (``oflct-bench-<hex>``):

1. a veth pair whose far end swallows packets, a static neighbour, and an nft ruleset with a
   ``ct state`` rule (conntrack tracks nothing in a fresh netns until a ruleset uses it);
   ``nf_conntrack_acct=1`` (so entries carry counters, as on an agent's node) and UDP timeouts of
   an hour (so nothing expires mid-run);
2. N distinct UDP flows (N sockets x ports), each leaving one conntrack entry in that namespace;
3. alternating rounds, A B A B ...: A = ``otelflow.conntrack.netlink.dump()`` (dump + parse into
   CtEntry objects), B = ``conntrack -L -o extended`` as a subprocess + a compiled-regex parser
   producing the same fields as typed values (the cyclic GC is paused for B too, as A does);
4. the RSS of a fresh process before and after holding the parsed entries.

The machine's own conntrack table is never read or modified. ``nf_conntrack_max`` is read-only in a
child namespace on this kernel (the global value applies); if it is too small for N it is raised
globally and restored afterwards. The namespace is always removed (finally + SIGINT/SIGTERM/SIGHUP).

Prints per-round figures and a final line:
``RESULT ratio=<median ours/theirs, >1 = we are faster> ours=<entries/s> theirs=<entries/s> rss_mib=<MiB>``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAX_PATH = "/proc/sys/net/netfilter/nf_conntrack_max"
LOCAL, SINK = "10.252.0.1", "10.252.0.2"  # only inside the benchmark namespace
RULESET = """
table inet oflct_bench {
  chain out { type filter hook output priority 0; ct state new counter; }
}
"""

# `conntrack -L -o extended` line, e.g.
# ipv4 2 udp 17 3599 src=A dst=B sport=1 dport=2 packets=1 bytes=29 [UNREPLIED] src=B dst=A sport=2 dport=1
#   packets=0 bytes=0 mark=0 use=1
# tcp adds a state after the timeout; icmp has type/code/id instead of ports; zone= appears when != 0.
THEIR_RX = re.compile(
    r"^(ipv[46])\s+\d+\s+\S+\s+(\d+)\s+(\d+)\s+(?:([A-Z_]+)\s+)?"
    r"src=(\S+) dst=(\S+) (?:sport=(\d+) dport=(\d+) )?(?:type=\d+ code=\d+ id=\d+ )?"
    r"(?:packets=(\d+) bytes=(\d+) )?(\[UNREPLIED\] )?"
    r"src=(\S+) dst=(\S+) (?:sport=(\d+) dport=(\d+) )?(?:type=\d+ code=\d+ id=\d+ )?"
    r"(?:packets=(\d+) bytes=(\d+) )?(\[ASSURED\] )?(?:\[\w+\] )*"
    r"mark=(\d+) (?:zone=(\d+) )?(?:\S+ )*?use=(\d+)",
    re.M,
)


def parse_theirs(text: str) -> list[tuple[Any, ...]]:
    """The fair competitor: every field ours has (except the id, absent from `-o extended`), typed."""
    out = []
    append = out.append
    for m in THEIR_RX.finditer(text):
        g = m.groups()
        append(
            (
                4 if g[0] == "ipv4" else 6,
                int(g[1]),
                int(g[2]),
                g[3],
                (g[4], g[5], int(g[6] or 0), int(g[7] or 0)),
                (g[11], g[12], int(g[13] or 0), int(g[14] or 0)),
                int(g[8]) if g[8] else None,
                int(g[9]) if g[9] else None,
                int(g[15]) if g[15] else None,
                int(g[16]) if g[16] else None,
                g[10] is None,  # seen reply
                g[17] is not None,  # assured
                int(g[18]),
                int(g[19] or 0),
                int(g[20]),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------
# inner modes (run inside the namespace through `ip netns exec`)
# ---------------------------------------------------------------------------------------------------


def inner_fill(n: int) -> None:
    """Create n UDP conntrack entries: 50 sockets x n/50 destination ports towards the sink."""
    import socket

    nsock = 50
    per = (n + nsock - 1) // nsock
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(nsock)]
    sent = 0
    for s in socks:
        for p in range(per):
            if sent >= n:
                break
            for _attempt in range(100):
                try:
                    s.sendto(b"z" * 32, (SINK, 10000 + p))
                    break
                except OSError:  # transient ENOBUFS from the qdisc: retry
                    time.sleep(0.001)
            sent += 1
    for s in socks:
        s.close()
    print(json.dumps({"sent": sent}))


def _ours() -> int:
    from otelflow.conntrack.netlink import dump

    return len(dump())


def _theirs() -> int:
    was = gc.isenabled()
    gc.disable()
    try:
        out = subprocess.run(
            ["conntrack", "-L", "-o", "extended"], capture_output=True, text=True, check=True
        ).stdout
        return len(parse_theirs(out))
    finally:
        if was:
            gc.enable()


def inner_bench(rounds: int) -> None:
    """Alternate A (ours) and B (theirs); also one kernel-only pass (recv without parsing)."""
    from otelflow.conntrack import netlink as nl

    # kernel-side cost alone: the same dump, bytes received and thrown away
    sock = nl._open_socket(0, nl.DEFAULT_DUMP_RCVBUF, nonblocking=False, force=False)
    t0 = time.perf_counter()
    sock.send(nl.build_dump_request(1))
    buf = bytearray(1 << 18)
    nbytes = 0
    while True:
        n = sock.recv_into(buf)
        nbytes += n
        if n <= 64 and buf[4] == nl.NLMSG_DONE:
            break
    kernel_s = time.perf_counter() - t0
    sock.close()

    # cross-check: both sides see the same entries (not timed)
    ours_e = nl.dump()
    theirs_e = parse_theirs(
        subprocess.run(["conntrack", "-L", "-o", "extended"], capture_output=True, text=True).stdout
    )
    ours_keys = sorted((e.orig.sport, e.orig.dport, e.orig_bytes) for e in ours_e)
    theirs_keys = sorted((t[4][2], t[4][3], t[7]) for t in theirs_e)  # sport, dport, orig bytes
    del ours_e, theirs_e
    res: dict[str, Any] = {
        "kernel_recv_s": kernel_s,
        "dump_bytes": nbytes,
        "same_entries": ours_keys == theirs_keys,
        "rounds": [],
    }
    _ours(), _theirs()  # warm-up: imports, templates, page cache for the conntrack binary
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        n_a = _ours()
        t_a = time.perf_counter() - t0
        gc.collect()
        t0 = time.perf_counter()
        n_b = _theirs()
        t_b = time.perf_counter() - t0
        res["rounds"].append({"ours_n": n_a, "ours_s": t_a, "theirs_n": n_b, "theirs_s": t_b})
    print(json.dumps(res))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def inner_rss() -> None:
    """RSS of a fresh process before and after dumping (and holding) the parsed entries."""
    from otelflow.conntrack.netlink import dump

    gc.collect()
    before = _rss_kib()
    entries = dump()
    gc.collect()
    after = _rss_kib()
    print(json.dumps({"n": len(entries), "before_kib": before, "after_kib": after}))


# ---------------------------------------------------------------------------------------------------
# outer mode: namespace lifecycle
# ---------------------------------------------------------------------------------------------------

_current: subprocess.Popen[str] | None = None


def run(*cmd: str, input: str | None = None, timeout: float = 600) -> str:
    """Run a command (killable from the signal handler's cleanup); raise on failure; return stdout."""
    global _current
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _current = p
    try:
        out, err = p.communicate(input, timeout=timeout)
    finally:
        _current = None
        if p.poll() is None:
            p.kill()
            p.wait()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err.strip()}")
    return out


def in_ns(ns: str, *cmd: str, **kw: Any) -> str:
    return run("ip", "netns", "exec", ns, *cmd, **kw)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def setup(ns: str) -> None:
    run("ip", "netns", "add", ns)
    run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    run("ip", "-n", ns, "addr", "add", f"{LOCAL}/24", "dev", "v0")
    run("ip", "-n", ns, "link", "set", "v0", "up")
    run("ip", "-n", ns, "link", "set", "v1", "up")  # no address: everything arriving there is dropped
    run("ip", "-n", ns, "neigh", "add", SINK, "lladdr", "02:00:00:00:00:02", "dev", "v0", "nud", "permanent")
    in_ns(
        ns,
        "sysctl",
        "-qw",
        "net.netfilter.nf_conntrack_acct=1",
        "net.netfilter.nf_conntrack_udp_timeout=3600",
        "net.netfilter.nf_conntrack_udp_timeout_stream=3600",
    )
    in_ns(ns, "nft", "-f", "-", input=RULESET)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner", choices=["fill", "bench", "rss"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.inner:
        sys.path.insert(0, str(REPO))
        if args.inner == "fill":
            inner_fill(args.entries)
        elif args.inner == "bench":
            inner_bench(args.rounds)
        else:
            inner_rss()
        return 0

    if os.geteuid() != 0:
        print("bench/conntrack_dump.py: run as root (creates a network namespace)", file=sys.stderr)
        return 2

    ns = f"oflct-bench-{secrets.token_hex(4)}"
    restore_max: str | None = None
    me = str(Path(__file__).resolve())

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        setup(ns)
        cur_max = int(in_ns(ns, "cat", MAX_PATH))
        writable = in_ns(ns, "sh", "-c", f"test -w {MAX_PATH} && echo yes || echo no").strip() == "yes"
        need = args.entries + 1000
        note = "per-netns (writable in the namespace)" if writable else "global (read-only in a child netns)"
        if cur_max < need:
            if writable:
                in_ns(ns, "sysctl", "-qw", f"net.netfilter.nf_conntrack_max={need}")
                note += f"; raised to {need} inside the namespace"
            else:
                restore_max = _read(MAX_PATH)
                with open(MAX_PATH, "w") as f:
                    f.write(str(need))
                note += f"; raised globally {restore_max} -> {need}, restored at exit"
        else:
            note += f"; {cur_max} >= {need}, unchanged"
        print(f"namespace {ns}; nf_conntrack_max is {note}", flush=True)

        t0 = time.perf_counter()
        in_ns(ns, sys.executable, me, "--inner", "fill", "--entries", str(args.entries))
        count = int(in_ns(ns, "conntrack", "-C").strip())
        print(f"created {count} conntrack entries in {time.perf_counter() - t0:.2f}s", flush=True)
        if count < args.entries:
            raise RuntimeError(f"only {count} of {args.entries} entries exist")

        res = json.loads(in_ns(ns, sys.executable, me, "--inner", "bench", "--rounds", str(args.rounds)))
        print(
            f"kernel only (recv, no parse): {res['kernel_recv_s']:.3f}s for "
            f"{res['dump_bytes'] / 2**20:.1f} MiB; both parsers saw the same entries: {res['same_entries']}"
        )
        ratios, ours_rates, their_rates = [], [], []
        for i, r in enumerate(res["rounds"], 1):
            ours_rate, their_rate = r["ours_n"] / r["ours_s"], r["theirs_n"] / r["theirs_s"]
            ours_rates.append(ours_rate)
            their_rates.append(their_rate)
            ratios.append(ours_rate / their_rate)
            print(
                f"round {i}: ours {r['ours_n']} entries {r['ours_s']:.3f}s = {ours_rate:,.0f}/s | "
                f"conntrack -L -o extended+regex {r['theirs_n']} entries {r['theirs_s']:.3f}s = "
                f"{their_rate:,.0f}/s | ratio {ours_rate / their_rate:.2f}",
                flush=True,
            )
        rss = json.loads(in_ns(ns, sys.executable, me, "--inner", "rss"))
        rss_mib = rss["after_kib"] / 1024
        delta_mib = (rss["after_kib"] - rss["before_kib"]) / 1024
        print(
            f"RSS holding {rss['n']} parsed entries: {rss_mib:.1f} MiB "
            f"(before dump {rss['before_kib'] / 1024:.1f} MiB, +{delta_mib:.1f} MiB = "
            f"{(rss['after_kib'] - rss['before_kib']) * 1024 / max(rss['n'], 1):.0f} B/entry)"
        )
        ours_med, theirs_med = statistics.median(ours_rates), statistics.median(their_rates)
        print(
            f"RESULT ratio={statistics.median(ratios):.2f} ours={ours_med:.0f} theirs={theirs_med:.0f} "
            f"rss_mib={rss_mib:.1f} rss_delta_mib={delta_mib:.1f} entries={count}"
        )
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # finish cleaning up whatever arrives
        if _current is not None and _current.poll() is None:
            _current.kill()
            _current.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if restore_max is not None:
            with open(MAX_PATH, "w") as f:
                f.write(restore_max)
        if ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
            print(f"WARNING: namespace {ns} still exists", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
