"""The collector stopped for two minutes mid-run: the agents stay up, their memory stays bounded, the
failures are counted on their /metrics, and once the collector is back the cumulative totals in
Prometheus are exactly right, for a flow that ran through the outage and for flows entirely inside it."""

from __future__ import annotations

import re
import time
from pathlib import Path

from otelflow.netlab.agents import agents
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator
from tests.e2e.components import Collector, Prometheus, http_get
from tests.e2e.test_otlp_export import promql, wait_value

OUTAGE = 120.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def self_metric(netns: str, name: str) -> float:
    code, body = http_get(netns, "http://127.0.0.1:9465/metrics")
    assert code == 200
    total = 0.0
    for line in body.decode().splitlines():
        if re.match(rf"^{name}(\{{.*\}})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def expectations(lab: Lab, results: list[FlowResult]) -> list[tuple[str, float]]:
    """(PromQL, expected total) for both directions of each flow."""
    out = []
    for r in results:
        src = {"workload": lab.topology.pod(r.spec.client).workload}
        dst = {"workload": lab.topology.pod(r.spec.server).workload}
        out.append(
            (promql("otelflow_flow_bytes_total", src, dst, r.server_port, "tcp"), float(r.up_l3_bytes))
        )
        out.append(
            (promql("otelflow_flow_bytes_total", dst, src, r.server_port, "tcp"), float(r.down_l3_bytes))
        )
    return out


def test_collector_away_for_two_minutes(collector_bin: str, tmp_path: Path) -> None:
    with Lab(demo_topology()) as lab:
        fabric, ip = lab.names.router(), str(lab.topology.router_ip(4))
        col = Collector(collector_bin, fabric, ip, tmp_path)
        prom = Prometheus(fabric, ip, f"{ip}:9464", tmp_path)
        inv = lab.write_inventory(str(tmp_path / "inventory.yaml"))
        env = {"OTEL_METRIC_EXPORT_INTERVAL": "1000", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{ip}:4317"}
        gen = TrafficGenerator(lab, timeout=OUTAGE + 120)
        prom.start()
        col.start()
        try:
            with agents(lab, ["node-a", "node-b"], inventory=inv, extra_env=env) as runs:
                spec = FlowSpec("cart-0", "db-0", up=700_000, down=1_400_000, duration=OUTAGE + 20, port=7201)
                through = gen.start([spec])
                time.sleep(5)
                rss_before = {n: rss_mib(r.proc.pid) for n, r in runs.items()}
                col.stop()
                t0 = time.monotonic()
                time.sleep(5)
                inside: list[FlowResult] = gen.run(
                    [
                        FlowSpec("frontend-0", "cart-0", up=20_000 + i, down=60_000 + i, port=7210 + i)
                        for i in range(5)
                    ]
                )
                time.sleep(max(0.0, OUTAGE - (time.monotonic() - t0)))
                for r in runs.values():
                    assert r.proc.poll() is None, (
                        f"agent on {r.node} died during the outage: {r.stderr[-1000:]}"
                    )
                grown = {n: rss_mib(r.proc.pid) - rss_before[n] for n, r in runs.items()}
                failed = self_metric(lab.node_netns("node-a"), "otelflow_agent_export_failed_requests_total")
                col.start()
                [long] = through.result(timeout=120)
                # with the collector back, each agent's next attempt (after at most one backoff, <= 10 s)
                # carries its newest cumulative snapshot: wait for every total while the agents run
                deadline = time.monotonic() + 60
                for q, want in expectations(lab, [long, *inside]):
                    wait_value(prom, q, want, timeout=max(1.0, deadline - time.monotonic()))
            assert long.ok and all(r.ok for r in inside)
            assert all(g < 30 for g in grown.values()), f"agent memory grew during the outage: {grown} MiB"
            assert failed > 0  # the failures are visible, not silent
            for q, want in expectations(lab, [long, *inside]):
                assert wait_value(prom, q, want) == want, q
        finally:
            col.stop()
            prom.stop()
