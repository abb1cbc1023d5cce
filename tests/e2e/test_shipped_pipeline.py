"""The shipped collector configuration and dashboards, against real agents' data.

Agents on two netlab nodes export to a real collector run with collector-config/gateway.yaml merged
with collector-config/loki.yaml, exactly as documented (`--config gateway.yaml --config loki.yaml`),
plus one override file that only swaps the Loki exporter for a file exporter (no Loki binary exists
on these machines) and turns the collector's own telemetry off. Its endpoints listen on 0.0.0.0
inside the lab's fabric namespace, which only the lab can reach. A real Prometheus scrapes the
gateway's prometheus exporter.

- Every dashboard query runs in Prometheus without error, and returns data whenever every metric
  it reads exists (the eBPF-only TCP metrics do not, with the conntrack source).
- The service map's queries, evaluated on the counters instead of their rates, give each edge
  (source workload -> destination workload, the way the bytes travel) and each node exactly the
  bytes the kernel counted.
- The loki.yaml processors put each flow record's namespaces on its resource: client/server
  namespaces moved there, and k8s.namespace.name = the server's namespace, else the client's, never
  the agent's own.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from otelflow.netlab import ns as nsu
from otelflow.netlab.agents import agents
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator
from tests.e2e.components import Prometheus, http_get, running, stop_process, wait_http
from tests.e2e.test_collector_configs import CONFIG_DIR, build_of
from tests.unit.test_dashboards import FILES, scan, substitute, variables_of

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "collector-config" / "gateway.yaml", ROOT / "collector-config" / "loki.yaml"]
CLUSTER = "ofl-lab"
AGENT_NAMESPACE = "otelflow-system"  # on the agents' resource, as a DaemonSet's namespace would be

# (flow, client's node id, server's node id): node ids as the service map builds them
FLOWS = [
    (FlowSpec("frontend-0", "cart-0", up=110_001, down=230_001), "shop/frontend", "shop/cart"),
    (FlowSpec("cart-0", "db-0", up=110_002, down=230_002), "shop/cart", "data/db"),
    (FlowSpec("cart-0", "internet", up=110_003, down=230_003), "shop/cart", "[internet]"),
    (FlowSpec("internet", "frontend-1", up=110_004, down=230_004), "[internet]", "shop/frontend"),
]
# the namespace Loki should index each flow under: the server's, else the client's
LOKI_NAMESPACE = ["shop", "data", "shop", "shop"]


class ShippedCollector:
    """The collector with the shipped files, in the lab's fabric namespace."""

    def __init__(self, binary: str, netns: str, ip: str, workdir: Path) -> None:
        self.binary, self.netns, self.ip, self.workdir = binary, netns, ip, workdir
        self.logs_file = workdir / "loki-logs.jsonl"
        self.override = workdir / "override.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        loki = yaml.safe_load(CONFIGS[1].read_text())
        logs = loki["service"]["pipelines"]["logs"]
        override = {
            "exporters": {"file/loki": {"path": str(self.logs_file)}},
            "service": {
                "telemetry": {"metrics": {"level": "none"}},
                "pipelines": {"logs": {**logs, "exporters": ["file/loki"]}},
            },
        }
        self.override.write_text(yaml.safe_dump(override))

    def start(self) -> None:
        args = [self.binary]
        for c in [*CONFIGS, self.override]:
            args += ["--config", str(c)]
        out = open(self.workdir / "collector.out", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(nsu.ns_cmd(self.netns, args), stdout=out, stderr=out)
        wait_http(self.netns, f"http://{self.ip}:13133/")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def resource_logs(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(resource attributes, record attributes) for every record the file exporter wrote."""
        out = []
        if not self.logs_file.exists():
            return out
        for line in self.logs_file.read_text().splitlines():
            for rl in json.loads(line).get("resourceLogs", []):
                res = attrs(rl.get("resource", {}).get("attributes", []))
                for sl in rl.get("scopeLogs", []):
                    for rec in sl.get("logRecords", []):
                        out.append((res, attrs(rec.get("attributes", []))))
        return out


def attrs(kvs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv["value"]
        out[kv["key"]] = int(v["intValue"]) if "intValue" in v else v.get("stringValue")
    return out


def query(prom: Prometheus, promql: str) -> list[dict[str, Any]]:
    url = f"http://{prom.ip}:9090/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    code, body = http_get(prom.netns, url, timeout=30)
    assert code == 200, (promql, body[:500])
    doc = json.loads(body)
    assert doc["status"] == "success", (promql, doc)
    return list(doc["data"]["result"])


def by_label(results: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in results}


@pytest.fixture(scope="module")
def shipped(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[FlowResult], Prometheus, ShippedCollector]]:
    (build,) = {build_of(c) for c in CONFIGS}
    p = subprocess.run(
        [str(ROOT / "scripts" / "build-collector"), str(CONFIG_DIR / build)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if p.returncode != 0:
        pytest.fail(f"collector for {build} not built: {p.stderr[-500:]}")
    binary = p.stdout.strip().splitlines()[-1]
    work = Path(tmp_path_factory.mktemp("shipped"))
    with Lab(demo_topology()) as lab:
        fabric, ip = lab.names.router(), str(lab.topology.router_ip(4))
        col = ShippedCollector(binary, fabric, ip, work)
        prom = Prometheus(fabric, ip, f"{ip}:8889", work)
        inv = lab.write_inventory(str(work / "inventory.yaml"))
        env = {
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{ip}:4317",
            "OTELFLOW_CLUSTER_NAME": CLUSTER,
            "OTEL_RESOURCE_ATTRIBUTES": f"k8s.namespace.name={AGENT_NAMESPACE}",
        }
        col.start()
        try:
            with running(prom):
                with agents(lab, ["node-a", "node-b"], inventory=inv, extra_env=env):
                    results = TrafficGenerator(lab).run([f[0] for f in FLOWS])
                    time.sleep(2.5)  # a poll and an export after the last packet
                for r in results:
                    assert r.ok, r.error
                settle(prom)
                yield results, prom, col
        finally:
            col.stop()


def settle(prom: Prometheus) -> None:
    """Wait (bounded) until every otelflow series has at least three samples, so rate() over it has
    data: the gateway batches for up to 5 s, and the agents' last export comes at their exit."""
    deadline = time.monotonic() + 120
    required = {"otelflow_flow_bytes_total", "otelflow_agent_up"}
    while time.monotonic() < deadline:
        names = by_label(query(prom, 'count by (__name__) ({__name__=~"otelflow_.+"})'), "__name__")
        if required <= set(names) and all(
            query(prom, f"min(count_over_time({n}[10m])) >= 3") for n in sorted(names)
        ):
            return
        time.sleep(1)


def expected_edges(results: list[FlowResult]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (_, client, server), r in zip(FLOWS, results, strict=True):
        for edge, n in ((f"{client} -> {server}", r.up_l3_bytes), (f"{server} -> {client}", r.down_l3_bytes)):
            out[edge] = out.get(edge, 0.0) + n
    return out


def wait_for(prom: Prometheus, promql: str, label: str, want: dict[str, float]) -> dict[str, float]:
    """The query's values by `label` once they include `want` (bounded wait: the gateway batches for
    up to 5 s and Prometheus scrapes every second)."""
    deadline = time.monotonic() + 60
    while True:
        got = by_label(query(prom, promql), label)
        if all(got.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return got
        time.sleep(1)


def counters_instead_of_rates(expr: str) -> str:
    """rate(m{...}[$__rate_interval]) -> m{...}: the same query over the exact cumulative counters."""
    out, n = re.subn(r"rate\(([a-z_]+\{[^{}]*\})\[\$__rate_interval\]\)", r"\1", expr)
    assert n > 0 and "rate(" not in out
    return out


def service_map_targets() -> tuple[dict[str, str], dict[str, str]]:
    dash = json.loads((ROOT / "dashboards" / "service-map.json").read_text())
    (graph,) = [p for p in dash["panels"] if p["type"] == "nodeGraph"]
    env = {**variables_of(dash), "cluster": CLUSTER}
    return {t["refId"]: t["expr"] for t in graph["targets"]}, env


def test_service_map_edges_are_exact_bytes(shipped: Any) -> None:
    results, prom, _ = shipped
    targets, env = service_map_targets()
    edges_q = substitute(counters_instead_of_rates(targets["edges"]), env)
    want = expected_edges(results)
    got = wait_for(prom, edges_q, "id", want)
    assert {k: got.get(k) for k in want} == want
    # nothing else touches the lab's workloads (other edges: the agents' own OTLP traffic, node-side)
    workloads = {"shop/frontend", "shop/cart", "data/db"}
    extra = [e for e in got if e not in want and set(e.split(" -> ")) & workloads]
    assert extra == []


def test_service_map_nodes_are_exact_bytes(shipped: Any) -> None:
    results, prom, _ = shipped
    targets, env = service_map_targets()
    nodes_q = substitute(counters_instead_of_rates(targets["nodes"]), env)
    totals: dict[str, float] = {}
    for edge, n in expected_edges(results).items():
        for node in edge.split(" -> "):
            totals[node] = totals.get(node, 0.0) + n
    want = {k: v for k, v in totals.items() if not k.startswith("[")}
    got = wait_for(prom, nodes_q, "id", want)
    assert {k: got.get(k) for k in want} == want


def test_resource_attributes_are_labels(shipped: Any) -> None:
    _, prom, _ = shipped
    got = by_label(
        query(prom, f'sum by (k8s_node_name) (otelflow_agent_up{{k8s_cluster_name="{CLUSTER}"}})'),
        "k8s_node_name",
    )
    assert got == {"node-a": 1.0, "node-b": 1.0}


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for f in FILES:
        dash = json.loads(f.read_text())
        env = {**variables_of(dash), "cluster": CLUSTER, "__rate_interval": "5m", "__range": "30m"}
        for p in dash["panels"]:
            for t in p["targets"]:
                out.append((f"{f.name}: {p['title']} {t['refId']}", substitute(t["expr"], env)))
    return out


@pytest.mark.parametrize("q", dashboard_queries(), ids=lambda q: q[0])
def test_dashboard_query_runs_and_has_data(shipped: Any, q: tuple[str, str]) -> None:
    _, prom, _ = shipped
    expr = q[1]
    results = query(prom, expr)
    present = all(query(prom, f"count({m})") for m in scan(expr).metrics)
    if present:
        assert results, f"no data although every metric it reads exists: {expr}"


def test_loki_pipeline_puts_namespaces_on_the_resource(shipped: Any) -> None:
    results, _, col = shipped
    recs = col.resource_logs()
    assert recs
    for res, rec in recs:
        # moved, not copied
        assert "client.k8s.namespace.name" not in rec and "server.k8s.namespace.name" not in rec, rec
        client_ns = res.get("client.k8s.namespace.name")
        server_ns = res.get("server.k8s.namespace.name")
        assert res.get("k8s.namespace.name") == (server_ns or client_ns), res
        assert res.get("k8s.namespace.name") != AGENT_NAMESPACE
        assert res.get("service.name") == "otelflow" and res.get("k8s.cluster.name") == CLUSTER
    for (spec, _, _), r, ns in zip(FLOWS, results, LOKI_NAMESPACE, strict=True):
        mine = [(res, rec) for res, rec in recs if rec.get("client.port") == r.client_port]
        assert mine, spec
        assert {res.get("k8s.namespace.name") for res, _ in mine} == {ns}, spec
        assert sum(rec.get("otelflow.flow.bytes.c2s", 0) for _, rec in mine) == r.up_l3_bytes, spec
        assert sum(rec.get("otelflow.flow.bytes.s2c", 0) for _, rec in mine) == r.down_l3_bytes, spec
    # a flow with no namespace at either end (node-side traffic) gets none: not the agent's own
    for res, _ in recs:
        if "client.k8s.namespace.name" not in res and "server.k8s.namespace.name" not in res:
            assert "k8s.namespace.name" not in res, res
