"""Agents on two netlab nodes -> a real OpenTelemetry Collector (OTLP gRPC from one node, OTLP/HTTP
from the other, both gzip: grpc core's level over gRPC, level 1 over HTTP) -> its Prometheus exporter
scraped by a real Prometheus, and its file exporter for flow logs. PromQL totals must equal the
kernel's truth counters per scenario and direction, counted once across the cluster; flow logs must
carry both ends' names and the exact bytes, once per flow."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelflow.netlab.agents import AgentRun, agents
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator
from tests.e2e.components import Collector, Prometheus, running

NODES = ["node-a", "node-b"]
# name -> flow, the source end's and the destination end's selectors (workload, or peer class)


def W(name: str) -> dict[str, str]:
    return {"workload": name}


INTERNET = {"class": "internet"}
SCENARIOS: dict[str, tuple[FlowSpec, dict[str, str], dict[str, str]]] = {
    "same-node": (
        FlowSpec("frontend-0", "cart-0", up=120_001, down=340_001, port=7101),
        W("frontend"),
        W("cart"),
    ),
    "cross-node": (FlowSpec("cart-0", "db-0", up=120_002, down=340_002, port=7102), W("cart"), W("db")),
    "clusterip": (
        FlowSpec("payments-1", "svc/db", up=120_003, down=340_003, family=6),
        W("payments"),
        W("db"),
    ),
    "to-external": (FlowSpec("cart-0", "internet", up=120_004, down=340_004, port=7104), W("cart"), INTERNET),
    "from-external": (
        FlowSpec("internet", "frontend-1", up=120_005, down=340_005, port=7105),
        INTERNET,
        W("frontend"),
    ),
    "udp-clusterip": (
        FlowSpec("frontend-1", "svc/dns", proto="udp", up=12_000, down=24_000, datagram=600),
        W("frontend"),
        W("cart"),
    ),
}


def selector(prefix: str, end: dict[str, str]) -> str:
    if "workload" in end:
        return f'{prefix}_k8s_workload_name="{end["workload"]}"'
    return f'{prefix}_otelflow_peer_class="{end["class"]}"'


def promql(metric: str, src: dict[str, str], dst: dict[str, str], port: int, transport: str) -> str:
    labels = [
        selector("source", src),
        selector("destination", dst),
        f'server_port="{port}"',
        f'network_transport="{transport}"',
    ]
    return f"sum({metric}{{{','.join(labels)}}})"


@pytest.fixture(scope="module")
def e2e(
    collector_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Lab, dict[str, FlowResult], dict[str, AgentRun], Prometheus, Collector]]:
    work = Path(tmp_path_factory.mktemp("e2e"))
    with Lab(demo_topology()) as lab:
        fabric, ip = lab.names.router(), str(lab.topology.router_ip(4))
        col = Collector(collector_bin, fabric, ip, work)
        prom = Prometheus(fabric, ip, f"{ip}:9464", work)
        inv = lab.write_inventory(str(work / "inventory.yaml"))
        env = {
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_SERVICE_NAME": "otelflow",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",  # the default, as the README recommends it
            "OTELFLOW_EXPORT__OTLP__COMPRESSION_LEVEL": "1",  # HTTP's level (gRPC: grpc core's)
        }
        node_env = {
            "node-a": {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{ip}:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            "node-b": {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{ip}:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
        }
        with running(col, prom):
            with agents(lab, NODES, inventory=inv, extra_env=env, node_env=node_env) as runs:
                results = TrafficGenerator(lab).run([spec for spec, _, _ in SCENARIOS.values()])
                time.sleep(2.5)  # a poll and an export after the last packet
            # the agents exported once more on exit; give Prometheus a few scrapes
            time.sleep(3)
            yield lab, dict(zip(SCENARIOS, results, strict=True)), runs, prom, col


def wait_value(prom: Prometheus, q: str, want: float, timeout: float = 20.0) -> float | None:
    deadline = time.monotonic() + timeout
    got = prom.query(q)
    while got != want and time.monotonic() < deadline:
        time.sleep(1)
        got = prom.query(q)
    return got


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_promql_totals_equal_the_truth_once(e2e: Any, name: str) -> None:
    _, results, _, prom, _ = e2e
    r: FlowResult = results[name]
    assert r.ok, r.error
    _, src, dst = SCENARIOS[name]
    port, transport = r.server_port, r.spec.proto
    cases = [
        ("otelflow_flow_bytes_total", src, dst, r.up_l3_bytes),
        ("otelflow_flow_packets_total", src, dst, r.up_l3_packets),
        ("otelflow_flow_bytes_total", dst, src, r.down_l3_bytes),
        ("otelflow_flow_packets_total", dst, src, r.down_l3_packets),
    ]
    for metric, a, b, want in cases:
        q = promql(metric, a, b, port, transport)
        assert wait_value(prom, q, float(want)) == float(want), q


def test_connections_and_interzone(e2e: Any) -> None:
    _, results, _, prom, _ = e2e
    r = results["cross-node"]  # cart (zone-a) -> db (zone-b)
    q = promql(
        "otelflow_connections_opened_total", {"workload": "cart"}, {"workload": "db"}, r.server_port, "tcp"
    )
    assert wait_value(prom, q, 1.0) == 1.0
    q = promql(
        "otelflow_flow_interzone_bytes_total", {"workload": "cart"}, {"workload": "db"}, r.server_port, "tcp"
    )
    assert wait_value(prom, q, float(r.up_l3_bytes)) == float(r.up_l3_bytes)
    same = results["same-node"]
    q = promql(
        "otelflow_flow_interzone_bytes_total",
        {"workload": "frontend"},
        {"workload": "cart"},
        same.server_port,
        "tcp",
    )
    assert prom.query(q) is None  # same zone: no inter-zone bytes


def test_flow_logs_carry_names_and_exact_bytes_once(e2e: Any) -> None:
    _, results, _, _, col = e2e
    recs = col.log_records()
    assert recs
    for name, r in results.items():
        mine = [
            x
            for x in recs
            if x.get("client.port") == r.client_port and x.get("network.transport") == r.spec.proto
        ]
        assert mine, name
        assert len({x["otelflow.observer"] for x in mine}) == 1, f"{name} logged by more than one node"
        assert sum(x.get("otelflow.flow.bytes.c2s", 0) for x in mine) == r.up_l3_bytes, name
        assert sum(x.get("otelflow.flow.bytes.s2c", 0) for x in mine) == r.down_l3_bytes, name
        _, src, dst = SCENARIOS[name]
        if "workload" in src:
            assert mine[0]["client.k8s.workload.name"] == src["workload"]
        if "workload" in dst:
            assert mine[0]["server.k8s.workload.name"] == dst["workload"]
        if r.spec.server.startswith("svc/"):
            assert mine[0]["k8s.service.name"] == r.spec.server[4:]
            assert mine[0]["otelflow.nat.dialed.address"] == r.dialed_ip


def test_agent_health_arrives_through_the_sdk(e2e: Any) -> None:
    """The agents' own telemetry goes over OTLP through the OpenTelemetry SDK: both agents report."""
    _, _, _, prom, _ = e2e
    assert prom.query("count(otelflow_agent_up)") == 2.0
    records = prom.query("sum(otelflow_agent_flow_records_total)")
    assert records is not None and records > 0
    assert prom.query("sum(otelflow_agent_export_failed_requests_total)") == 0.0


def test_agents_exited_cleanly_and_exported_without_errors(e2e: Any) -> None:
    _, _, runs, _, _ = e2e
    for run in runs.values():
        assert run.proc.returncode == 0, run.stderr[-2000:]
        assert "export failed" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
