#!/usr/bin/env python3
"""Benchmark: what the TCP health tracing programs (bpf/health.bpf.c) cost the TCP stack.

Run as root: ``python bench/tcp_health_overhead.py [--rounds 5] [--seconds 3] [--json]``.

A netlab node with two pods on its bridge (offloads off: every segment MTU-sized, the worst case
for per-segment hooks); iperf3 TCP from pod a to pod b for ``--seconds`` per round, alternating
rounds *bare* and *attached* (TcpHealth with every feature, as the agent would load it), A B A B.
tcp_probe runs for every segment a socket receives in ESTABLISHED (the receiver's data and the
sender's ACKs), so this is the hook that matters. Reported: the median throughput of each and the
median of the per-pair ratios attached/bare; then, from one more attached round with the kernel's
per-program statistics on (BPF_ENABLE_STATS, never during the timed rounds), the program runs,
their time per run and their share of a CPU. The figures are ratios against bare rounds of the same
process on the same machine. Prints ``RESULT throughput_ratio=<x> ns_per_event=<y>``. Everything
runs in lab namespaces removed at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ebpf_overhead import iperf_round, iperf_server, prog_stats
from otelflow.ebpf import libbpf as lb
from otelflow.ebpf.health import TcpHealth
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import NodeSpec, PodSpec, Topology


def run(rounds: int, seconds: float) -> dict[str, Any]:
    topo = Topology(nodes=(NodeSpec("n1"),), pods=(PodSpec("a", "n1"), PodSpec("b", "n1")), ipv6=False)
    bare: list[float] = []
    attached: list[float] = []
    samples = 0
    with Lab(topo) as lab:
        srv = iperf_server(lab)
        try:
            for i in range(rounds):
                bare.append(iperf_round(lab, seconds))
                with TcpHealth() as th:
                    attached.append(iperf_round(lab, seconds))
                    samples += sum(s.rtt_samples for s in th.drain().sockets)
                print(
                    f"  round {i + 1}: bare {bare[-1] / 1e9:.2f} Gbit/s, attached {attached[-1] / 1e9:.2f} "
                    f"Gbit/s ({attached[-1] / bare[-1]:.3f})",
                    flush=True,
                )
            stats_fd = lb.check(lb.lib().bpf_enable_stats(lb.BPF_STATS_RUN_TIME), "bpf_enable_stats")
            try:
                with TcpHealth() as th:
                    before = prog_stats(th.prog_ids)
                    iperf_round(lab, seconds)
                    after = prog_stats(th.prog_ids)
                    hooks = dict(th.hooks)
            finally:
                os.close(stats_fd)
        finally:
            srv.kill()
            srv.wait()
    ratios = [x / y for x, y in zip(attached, bare, strict=True)]
    run_ns, run_cnt = after[0] - before[0], after[1] - before[1]
    return {
        "hooks": hooks,
        "bare_gbps": statistics.median(bare) / 1e9,
        "attached_gbps": statistics.median(attached) / 1e9,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "rtt_samples_recorded": samples,
        "prog_runs": run_cnt,
        "prog_ns_per_run": run_ns / run_cnt if run_cnt else 0.0,
        "prog_cpu_share": run_ns / 1e9 / seconds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("tcp_health_overhead: needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    r = run(args.rounds, args.seconds)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"throughput: bare {r['bare_gbps']:.2f} Gbit/s, attached {r['attached_gbps']:.2f} Gbit/s, "
            f"median ratio {r['ratio']:.3f}\n"
            f"programs: {r['prog_runs']:,} runs, {r['prog_ns_per_run']:.0f} ns per run (kernel's figure), "
            f"{r['prog_cpu_share'] * 100:.2f}% of a CPU"
        )
    print(f"RESULT throughput_ratio={r['ratio']:.3f} ns_per_event={r['prog_ns_per_run']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
