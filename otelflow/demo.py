"""`otelflow demo`: a two-node lab cluster on this machine, real traffic, and one otelflow agent per
node naming every flow (from the lab's inventory) and counting each byte once.

Every few seconds it prints who talks to whom, with bytes/s counted once cluster-wide, zone-crossing
and external traffic marked; at the end it compares the agents' cluster-wide total with the kernel's
own counters of the same flows. On a terminal it opens `otelflow top` on the lab's agents instead
of the tables, with traffic in rounds until the user quits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from otelflow.demo_otlp import ExportPlan, ExportSetupError, export_relays, plan_export, relay_failures
from otelflow.netlab import ns as nsu
from otelflow.netlab.agents import AgentRun, agents, counted
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator

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
        FlowSpec("internet", "frontend-0", up=30_000, down=900_000, duration=long),
        FlowSpec("frontend-1", "node-exporter-a", up=2_000, down=300_000, duration=long),
    ]
    t = 0.5
    while t < duration - 1.0:  # short flows: DNS lookups and quick calls, closed within a second
        flows.append(FlowSpec("frontend-0", "svc/dns", proto="udp", up=60, down=180, delay=t, datagram=60))
        flows.append(FlowSpec("frontend-1", "cart-0", up=2_000, down=15_000, delay=t))
        t += 1.0
    return flows


def label(peer: dict[str, Any]) -> str:
    if peer["kind"] == "pod":
        return f"{peer['namespace']}/{peer['workload_name'] or peer['name']}"
    if peer["kind"] in ("node", "host"):
        return f"{peer['kind']}/{peer['name']}"
    return f"[{peer['peer_class']}]"


def render(records: list[dict[str, Any]], seconds: float) -> str:
    """Conversations (client -> server, Service) with bytes/s counted once, busiest first."""
    rows: dict[tuple[str, str, str, str], list[float]] = {}
    for r in records:
        c, s = r["client"], r["server"]
        note = ""
        if c["kind"] == "external" or s["kind"] == "external":
            note = "external"
        elif c["zone"] and s["zone"] and c["zone"] != s["zone"]:
            note = "cross-zone"
        key = (label(c), label(s), r["service"] or "", note)
        acc = rows.setdefault(key, [0.0, 0.0])
        acc[0] += (r["bytes_c2s"] or 0) if r["count_c2s"] else 0
        acc[1] += (r["bytes_s2c"] or 0) if r["count_s2c"] else 0
    head = f"   {'client':<22} {'server':<22} {'service':<16} {'c->s B/s':>10} {'s->c B/s':>10}  note"
    lines = [head]
    for (c, s, svc, note), (up, down) in sorted(rows.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:14]:
        lines.append(f"   {c:<22} {s:<22} {svc:<16} {up / seconds:>10,.0f} {down / seconds:>10,.0f}  {note}")
    return "\n".join(lines)


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _with_tables(lab: Lab, runs: dict[str, AgentRun], duration: float) -> list[FlowResult]:
    """No terminal: one round of traffic, a table of who talks to whom every few seconds."""
    print(f"running traffic for {duration:.0f} s", flush=True)
    fut = TrafficGenerator(lab, timeout=duration + 60).start(traffic_mix(duration))
    deadline = time.monotonic() + duration + 60
    every = min(4.0, max(1.0, duration / 3))
    while not fut.done() and time.monotonic() < deadline:
        time.sleep(every)
        fresh = [x for run in runs.values() for x in run.take_new()]
        print(f"\n--- {time.strftime('%H:%M:%S')}: last {every:.0f} s, each byte counted once ---")
        print(render(fresh, every), flush=True)
    return fut.result(timeout=max(1.0, deadline - time.monotonic()))


@dataclass
class Tally:
    """What the final comparison needs of the finished flows (kept as sums: rounds never pile up)."""

    flows: int = 0
    agent_bytes: int = 0
    truth_bytes: int = 0
    incomplete: int = 0
    bad: list[FlowResult] = field(default_factory=list)  # the first few incomplete flows
    error: str = ""  # why the traffic rounds stopped before the user quit

    def add(self, results: list[FlowResult], agent_bytes: int) -> None:
        bad = [r for r in results if not r.ok]
        self.flows += len(results)
        self.agent_bytes += agent_bytes
        self.truth_bytes += sum(r.up_l3_bytes + r.down_l3_bytes for r in results)
        self.incomplete += len(bad)
        self.bad += bad[: max(0, 5 - len(self.bad))]


def agent_bytes(runs: dict[str, AgentRun], results: list[FlowResult]) -> int:
    """Bytes the agents counted (count-once directions) for these generator flows."""
    ours = {(r.spec.proto, r.client_port) for r in results}  # the generator's flows, not lab noise
    records = [x for run in runs.values() for x in run.records if (x["transport"], x["client_port"]) in ours]
    return sum(v for i, v in enumerate(counted(records)) if i % 2 == 0)


def _forget_before(runs: dict[str, AgentRun], last_port: int) -> None:
    """Drop the agents' records that no later round needs: flows of finished rounds (client ports
    are handed out in increasing order) and loopback noise (top's own requests). The reader threads
    only append, and a slice delete or insert is one atomic list operation, so nothing new is lost."""
    for run in runs.values():
        recs = run.records
        n = len(recs)
        keep = [x for x in recs[:n] if x["client_port"] > last_port and not x["client_ip"].startswith("127.")]
        del recs[:n]
        recs[0:0] = keep


def _with_top(lab: Lab, nodes: list[str], runs: dict[str, AgentRun], duration: float) -> Tally:
    """A terminal: rounds of traffic until the user quits `otelflow top`, which reads every node's
    agent (its api.listen, 127.0.0.1:9465 inside the node's namespace). Each finished round is
    compared as it ends and its records forgotten (they do not pile up however long it runs); a round
    still running when the user quits is left out."""
    from otelflow.top import loader, show
    from otelflow.top.sources import Fetcher, NetnsAgent
    from otelflow.top.view import State

    stop = threading.Event()
    tally = Tally()

    def rounds() -> None:
        while not stop.is_set():
            try:
                res = TrafficGenerator(lab, timeout=duration + 60).run(traffic_mix(duration))
            except Exception as e:  # the lab going away under a round after quitting is expected
                if not stop.is_set():
                    tally.error = f"traffic stopped: {type(e).__name__}: {e}"
                return
            if stop.wait(1.5):  # the agents' last poll of this round
                return
            tally.add(res, agent_bytes(runs, res))
            _forget_before(runs, max(r.client_port for r in res))

    threading.Thread(target=rounds, name="demo-traffic", daemon=True).start()
    print(f"running traffic in rounds of {duration:.0f} s; opening otelflow top (q quits)", flush=True)
    time.sleep(2.0)  # let the first poll land, so the first screen has rows
    fetcher = Fetcher([NetnsAgent(lab.node_netns(n), "127.0.0.1", 9465, n) for n in nodes], wait=1.0)
    try:
        show(loader(fetcher, 500), State(pane="workloads"), 1.0)
    finally:
        stop.set()
        fetcher.close()
    return tally


def chosen_source(run: AgentRun) -> str:
    """What the agent logged as its flow source ("ebpf (...)" or "conntrack (...)")."""
    for line in list(run._err_lines):
        if "flow source: " in line:
            return line.split("flow source: ", 1)[1].strip()
    return "not reported"


def _export_summary(plan: ExportPlan, relayed: tuple[int, int, str]) -> bool:
    """Say where the flows went; False when the relays could not reach the collector."""
    total, failed, last = relayed
    if failed:
        print(
            f"otelflow demo: OTLP export: {failed} of {total} connections to {plan.host}:{plan.port} "
            f"failed (last: {last}); the agents count the lost exports in their self-metrics",
            file=sys.stderr,
        )
        return False
    print(f"exported over OTLP to {plan.endpoint} ({total} connections through the node relays)")
    return True


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
    try:
        plan = plan_export(os.environ)
    except ExportSetupError as e:
        print(f"otelflow demo: OTLP export: {e}", file=sys.stderr)
        return 1
    topology = demo_topology()
    nodes = [n.name for n in topology.nodes]
    tty = interactive()  # a terminal: open top; otherwise print tables
    say = (lambda m: print(f"  building {m} ...", flush=True)) if sys.stdout.isatty() else (lambda m: None)
    print("otelflow demo: building a two-node lab cluster in network namespaces", flush=True)
    lab = Lab(topology)
    tmp = tempfile.TemporaryDirectory(prefix="otelflow-demo-")
    try:
        with _sigterm_as_interrupt():
            lab.up(progress=say)
            inventory = lab.write_inventory(str(Path(tmp.name) / "inventory.yaml"))
            print(f"lab {lab.lab_id} is up (namespaces {lab.names.prefix}*); starting one agent per node")
            relays: list[Any] = []
            with contextlib.ExitStack() as stack:
                if plan:  # relays first: they close after the agents' final export
                    relays = stack.enter_context(export_relays(plan, [lab.node_netns(n) for n in nodes]))
                    print(f"exporting to {plan.describe()} through a relay in each node's namespace")
                runs = stack.enter_context(
                    agents(
                        lab,
                        nodes,
                        poll=1.0,
                        inventory=inventory,
                        source="auto",
                        extra_env=plan.env if plan else None,
                    )
                )
                for n in nodes:
                    print(f"  {n}: flow source {chosen_source(runs[n])}", flush=True)
                results: list[FlowResult] = []
                if tty:
                    tally = _with_top(lab, nodes, runs, args.duration)
                else:
                    results = _with_tables(lab, runs, args.duration)
                    time.sleep(1.5)  # the agents' last poll
            exported = _export_summary(plan, relay_failures(relays)) if plan else True
            if not tty:  # the agents have stopped: their final flush is in
                tally = Tally()
                tally.add(results, agent_bytes(runs, results))
            if tally.error:
                print(f"otelflow demo: {tally.error}", file=sys.stderr)
            if not tally.flows:
                print("no traffic round finished before top was closed: nothing to compare")
                return 1 if tally.error else 0
            a, t = tally.agent_bytes, tally.truth_bytes
            diff = abs(a - t) / t * 100 if t else 0.0
            print(f"\n{tally.flows} flows; the agents counted {a:,} bytes, once, on {len(nodes)} nodes;")
            print(f"the kernel's own counters of the same flows say {t:,} bytes ({diff:.3f}% apart)")
            for r in tally.bad:
                print(f"  incomplete: {r.spec.client} -> {r.spec.server}: {r.error}")
            if tally.incomplete > len(tally.bad):
                print(f"  ... {tally.incomplete} incomplete in all")
            return 0 if not (tally.incomplete or tally.error) and exported else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (nsu.NetlabError, ExportSetupError) as e:
        print(f"otelflow demo: {e}", file=sys.stderr)
        return 1
    finally:
        tmp.cleanup()
        if getattr(args, "keep", False):
            print(f"lab {lab.lab_id} left up: remove it with 'otelflow netlab down {lab.lab_id}'")
        else:
            lab.down()
            print(f"lab {lab.lab_id} removed")
