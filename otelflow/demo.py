"""`otelflow demo`: a two-node lab cluster on this machine with realistic traffic.

For now the demo shows what each node's conntrack sees, named with the lab's inventory; later
issues replace the table with the agent's own view (`otelflow top`) and OTLP export.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType

from otelflow.netlab import ns as nsu
from otelflow.netlab.ctcli import CtRow, conntrack_rows
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import Topology, demo_topology
from otelflow.netlab.traffic import FlowSpec, TrafficGenerator

REQUIRED_TOOLS = ("ip", "nft", "conntrack", "ethtool", "sysctl")


def traffic_mix(duration: float) -> list[FlowSpec]:
    """A shop: frontends call payments through its Service, payments use the database, the cart
    calls an external API, DNS over UDP, a host-network exporter scraped across nodes."""
    long = max(duration - 2.0, 1.0)
    flows = [
        FlowSpec("frontend-0", "svc/payments", up=400_000, down=4_000_000, duration=long),
        FlowSpec("frontend-1", "svc/payments", up=200_000, down=2_000_000, duration=long, family=6),
        FlowSpec("payments-0", "svc/db", up=1_000_000, down=8_000_000, duration=long),
        FlowSpec("payments-1", "svc/db", up=500_000, down=3_000_000, duration=long),
        FlowSpec("cart-0", "internet", up=50_000, down=600_000, duration=long),
        FlowSpec("frontend-1", "node-exporter-a", up=2_000, down=300_000, duration=long),
    ]
    t = 0.5
    while t < duration - 1.0:  # short flows: DNS lookups and quick calls, closed within a second
        flows.append(FlowSpec("frontend-0", "svc/dns", proto="udp", up=60, down=180, delay=t, datagram=60))
        flows.append(FlowSpec("frontend-1", "cart-0", up=2_000, down=15_000, delay=t))
        t += 1.0
    return flows


def _names(t: Topology) -> dict[str, str]:
    out: dict[str, str] = {}
    for fam in t.families:
        for n in t.nodes:
            out[str(t.node_ip(n.name, fam))] = f"node/{n.name}"
        for p in t.pods:
            if not p.host_network:
                out[str(t.pod_ip(p.name, fam))] = f"{p.namespace}/{p.name}"
        for s in t.services:
            out[str(t.service_ip(s.name, fam))] = f"svc:{s.namespace}/{s.name}"
        for e in t.externals:
            out[str(t.external_ip(e.name, fam))] = f"external/{e.name}"
    return out


def render(rows_by_node: dict[str, list[CtRow]], names: dict[str, str]) -> str:
    lines = []
    for node, rows in rows_by_node.items():
        flows = [r for r in rows if r.proto in ("tcp", "udp") and "sport" in r.orig]
        lines.append(f"== {node}: {len(flows)} flows in conntrack")
        head = (
            f"{'client':<26} {'server (answered by)':<44} {'proto':<5} {'bytes c->s':>11} {'bytes s->c':>11}"
        )
        lines.append(f"   {head}")
        for r in sorted(flows, key=lambda r: -(r.count("orig", "bytes") + r.count("reply", "bytes")))[:12]:
            o, rp = r.orig, r.reply
            client = names.get(o["src"], o["src"])
            dialed = names.get(o["dst"], o["dst"])
            answered = names.get(rp["src"], rp["src"])
            server = dialed if answered == dialed else f"{dialed} ({answered})"
            lines.append(
                f"   {client:<26} {server + ':' + o['dport']:<44} {r.proto:<5} "
                f"{r.count('orig', 'bytes'):>11,} {r.count('reply', 'bytes'):>11,}"
            )
    return "\n".join(lines)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(args: argparse.Namespace) -> int:
    try:
        nsu.require_root()
    except nsu.NetlabError:
        print(
            "otelflow demo needs root: it builds network namespaces, veths and nftables rules.",
            file=sys.stderr,
        )
        print("run it as: sudo otelflow demo   (or ./scripts/demo from a checkout)", file=sys.stderr)
        return 1
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        print(
            f"otelflow demo: missing tools: {', '.join(missing)} (./scripts/setup installs them)",
            file=sys.stderr,
        )
        return 1
    topology = demo_topology()
    names = _names(topology)
    say = (lambda m: print(f"  building {m} ...", flush=True)) if sys.stdout.isatty() else (lambda m: None)
    print("otelflow demo: building a two-node lab cluster in network namespaces", flush=True)
    lab = Lab(topology)
    try:
        with _sigterm_as_interrupt():
            lab.up(progress=say)
            print(f"lab {lab.lab_id} is up (namespaces {lab.names.prefix}*)")
            print(f"running traffic for {args.duration:.0f} s")
            fut = TrafficGenerator(lab, timeout=args.duration + 60).start(traffic_mix(args.duration))
            deadline = time.monotonic() + args.duration + 60
            while not fut.done() and time.monotonic() < deadline:
                time.sleep(min(5.0, args.duration / 2))
                snap = {n.name: conntrack_rows(lab.node_netns(n.name)) for n in topology.nodes}
                print(f"\n--- {time.strftime('%H:%M:%S')} ---\n{render(snap, names)}", flush=True)
            results = fut.result(timeout=max(1.0, deadline - time.monotonic()))
            bad = [r for r in results if not r.ok]
            total = sum(r.up_l3_bytes + r.down_l3_bytes for r in results)
            print(f"\n{len(results)} flows, {total:,} L3 bytes on the wire, {len(bad)} incomplete")
            for r in bad[:5]:
                print(f"  incomplete: {r.spec.client} -> {r.spec.server}: {r.error}")
            return 0 if not bad else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except nsu.NetlabError as e:
        print(f"otelflow demo: {e}", file=sys.stderr)
        return 1
    finally:
        if getattr(args, "keep", False) and lab.names:
            print(f"lab {lab.lab_id} left up: remove it with 'otelflow netlab down {lab.lab_id}'")
        else:
            lab.down()
            print(f"lab {lab.lab_id} removed")
