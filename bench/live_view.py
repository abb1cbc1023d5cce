#!/usr/bin/env python3
"""Benchmark: the live view (`/api/v1/top`) against the export stage's aggregator, same process,
same decorated deltas.

Per poll the agent hands every decorated delta to both sinks, so the live view's write cost is
printed as a ratio to Aggregator.add (workload level) over the same N flows (cold: every flow new;
warm: the same flows again). The snapshot (what one `top` refresh costs the agent: rates, nodes,
pairs and the busiest 500 connections, encoded as JSON) is timed at N flows and printed as a ratio
to one Prometheus `/metrics` rendering of the same data (what one scrape costs), with the JSON's
size. Medians over the rounds.

Usage: python bench/live_view.py [--flows 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

from otelflow.aggregate import Aggregator
from otelflow.decorate import DecoratedFlow
from otelflow.export import ExportStage
from otelflow.flow import FlowDelta
from otelflow.live import LiveView
from otelflow.meta.model import Peer, ServiceMeta


def deltas(n: int, t: float) -> list[DecoratedFlow]:
    out = []
    for i in range(n):
        w = i % 50
        client = Peer(
            "pod",
            "pod",
            f"node-{i % 20}",
            f"zone-{i % 3}",
            "r",
            f"ns{w % 7}",
            f"c{i}",
            "",
            f"wl{w}",
            "Deployment",
        )
        server = Peer(
            "pod",
            "pod",
            f"node-{(i + 1) % 20}",
            f"zone-{(i + 1) % 3}",
            "r",
            f"ns{w % 5}",
            f"s{w}",
            "",
            f"srv{w % 30}",
            "Deployment",
        )
        svc = ServiceMeta(f"ns{w % 5}", f"srv{w % 30}", ("10.96.0.1",)) if i % 2 else None
        f = FlowDelta(
            str(i),
            "conntrack",
            "node-0",
            4,
            "tcp",
            f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            30000 + i % 30000,
            "10.96.0.1",
            80,
            "10.250.0.1",
            8080,
            "10.0.0.1",
            30000,
            False,
            False,
            1000 + i,
            10,
            5000 + i,
            20,
            True,
            False,
            "ESTABLISHED",
            t,
            t,
        )
        out.append(DecoratedFlow(f, client, server, svc, True, i % 3 != 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rows: dict[str, list[float]] = {
        k: [] for k in ("cold", "warm", "snap", "agg_cold", "agg_warm", "agg_snap")
    }
    size = 0
    for _ in range(a.rounds):
        batch = deltas(a.flows, time.time())
        live = LiveView("node-0", window=10.0, max_connections=max(a.flows, 1))
        agg = Aggregator("workload")
        steps: list[tuple[str, Callable[[], object]]] = [
            ("agg_cold", partial(agg.add, batch)),
            ("cold", partial(live.write, batch)),
            ("agg_warm", partial(agg.add, batch)),
            ("warm", partial(live.write, batch)),
            ("agg_snap", ExportStage(agg, 60.0).prometheus),
        ]
        for name, fn in steps:
            t0 = time.process_time()
            fn()
            rows[name].append(time.process_time() - t0)
        t0 = time.process_time()
        snap = live.snapshot()
        body = json.dumps(snap, separators=(",", ":"))
        rows["snap"].append(time.process_time() - t0)
        size = len(body)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{a.flows} flows, {a.rounds} rounds, medians (CPU seconds)")
    print(
        f"  write cold: live {med['cold']:.4f}  aggregator {med['agg_cold']:.4f}  ratio {med['cold'] / med['agg_cold']:.2f}"
    )
    print(
        f"  write warm: live {med['warm']:.4f}  aggregator {med['agg_warm']:.4f}  ratio {med['warm'] / med['agg_warm']:.2f}"
    )
    print(
        f"  snapshot + JSON: {med['snap']:.4f} s ({size:,} bytes); a /metrics scrape {med['agg_snap']:.4f} s, ratio {med['snap'] / max(med['agg_snap'], 1e-9):.2f}"
    )


if __name__ == "__main__":
    main()
