"""The TCP RTT histogram end to end: an agent (`--source ebpf`) on a netlab node, one TCP flow between
its pod and an external host through a 60 ms one-way delay line, the agent exporting to a real
OpenTelemetry Collector whose Prometheus exporter a real Prometheus scrapes.

The truth is the agent's own flow records (`--output json`): each record's direction that this node
counts and that carries an RTT sample is one observation. Prometheus' `_count`, `_sum` and every
`_bucket` for the flow must equal what those observations make, exactly; the agent's own `/metrics`
must show the same histogram. Independently, every observation (and each socket's TCP_INFO
`tcpi_rtt` at close) must lie in the bucket that holds the delay line's 60 ms plus the lab's base RTT
(this kernel has no netem qdisc: the delay line is a TUN device in the router, see
tests/kernel/test_ebpf_health.py)."""

from __future__ import annotations

import bisect
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelflow.netlab.agents import AgentRun, agents, totals, truth
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import ExternalSpec, NodeSpec, PodSpec, Topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator
from otelflow.promexp import le_label
from otelflow.schema import RTT_BOUNDS_S
from tests.e2e.components import Collector, Prometheus, http_get, running
from tests.kernel.test_ebpf_health import DelayLine, delay_to_external
from tests.kernel.test_ebpf_source import metrics_of

TOPOLOGY = Topology(
    nodes=(NodeSpec("n1", zone="zone-a", region="lab"),),
    pods=(PodSpec("web-0", "n1", namespace="shop", workload="web", workload_kind="Deployment"),),
    externals=(ExternalSpec("ext"),),
)
DELAY_S = 0.060  # one-way, web-0 -> ext: both sockets' RTT include it (bucket 50-100 ms)
TUN_NAME = "rttun0"
PORT = 9611
BOUNDS_US = [round(b * 1e6) for b in RTT_BOUNDS_S]
LES = [*(le_label(b) for b in RTT_BOUNDS_S), "+Inf"]


def bucket(us: int) -> int:
    """Index of the bucket holding `us` (upper bound inclusive)."""
    return bisect.bisect_left(BOUNDS_US, us)


Run = tuple[FlowResult, AgentRun, str, dict[tuple[str, str], float]]


@pytest.fixture(scope="module")
def run(collector_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    work = Path(tmp_path_factory.mktemp("rtt"))
    with Lab(TOPOLOGY) as lab:
        router, ip = lab.names.router(), str(lab.topology.router_ip(4))
        line = DelayLine(router, TUN_NAME, DELAY_S)
        try:
            delay_to_external(lab, TUN_NAME)
            col = Collector(collector_bin, router, ip, work)
            prom = Prometheus(router, ip, f"{ip}:9464", work)
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{ip}:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            }
            inv = lab.write_inventory(str(work / "inventory.yaml"))
            with running(col, prom):
                with agents(lab, ["n1"], source="ebpf", inventory=inv, extra_env=env) as runs:
                    spec = FlowSpec("web-0", "ext", up=300_000, down=300_000, port=PORT, duration=1.5)
                    [r] = TrafficGenerator(lab).run([spec])
                    time.sleep(1.5)  # past the next polls: every sample drained
                    scraped = metrics_of(lab, "n1")
                # the agent exported once more on exit; wait for Prometheus to show that export
                want = observations(runs["n1"].flows_of(r))
                series = wait_series(ip, router, len(want))
            yield r, runs["n1"], scraped, series
        finally:
            line.close()


def observations(recs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(direction, rtt us) of every observation the agent made of this flow: a direction this node
    counts, in a record that carries a sample."""
    out = []
    for x in recs:
        for d in ("c2s", "s2c"):
            if x[f"count_{d}"] and x[f"rtt_us_{d}"] is not None:
                out.append((d, x[f"rtt_us_{d}"]))
    return out


def query_all(prom_ip: str, netns: str, promql: str) -> list[dict[str, Any]]:
    url = f"http://{prom_ip}:9090/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    code, body = http_get(netns, url)
    assert code == 200, body[:300]
    return list(json.loads(body)["data"]["result"])


def wait_series(prom_ip: str, netns: str, want: int, timeout: float = 30.0) -> dict[tuple[str, str], float]:
    """Every RTT series of the flow's port in Prometheus, as {(name, le or source), value}, once
    the total count reaches `want` (or at the timeout: the test then shows the difference)."""
    sel = f'server_port="{PORT}"'
    q = f'{{__name__=~"otelflow_tcp_rtt_seconds_(bucket|sum|count)",{sel}}}'  # every RTT series of the flow
    deadline = time.monotonic() + timeout
    while True:
        rows = query_all(prom_ip, netns, q)
        got: dict[tuple[str, str], float] = {}
        for row in rows:
            m = row["metric"]
            key = m["__name__"].removeprefix("otelflow_tcp_rtt_seconds_")
            src = m.get("source_k8s_workload_name") or m.get("source_otelflow_peer_class", "")
            got[(f"{key}:{src}", m.get("le", ""))] = float(row["value"][1])
        count = sum(v for (k, _), v in got.items() if k.startswith("count:"))
        if count == want or time.monotonic() > deadline:
            return got
        time.sleep(1)


def expected(obs: list[tuple[str, int]]) -> dict[tuple[str, str], float]:
    """The series these observations make (cumulative buckets per le, sum in seconds, count);
    c2s is sent by web (workload), s2c by the external host (the inventory's network "internet")."""
    out: dict[tuple[str, str], float] = {}
    for d, src in (("c2s", "web"), ("s2c", "internet")):
        vals = [us for dd, us in obs if dd == d]
        if not vals:
            continue
        per = [0] * len(LES)
        for us in vals:
            per[bucket(us)] += 1
        for i, le in enumerate(LES):
            out[(f"bucket:{src}", le)] = float(sum(per[: i + 1]))
        out[(f"sum:{src}", "")] = sum(vals) / 1e6
        out[(f"count:{src}", "")] = float(len(vals))
    return out


def test_prometheus_histogram_equals_the_agents_observations(run: Run) -> None:
    r, agent, _, series = run
    assert r.ok, r.error
    recs = agent.flows_of(r)
    assert totals(recs) == truth(r)  # the flow itself is exact (both directions counted on n1)
    assert all(x["count_c2s"] and x["count_s2c"] for x in recs)
    obs = observations(recs)
    per_dir = {d: sum(1 for dd, _ in obs if dd == d) for d in ("c2s", "s2c")}
    assert per_dir["c2s"] >= 2 and per_dir["s2c"] >= 2, per_dir  # a few polls each way
    want = expected(obs)
    got = series  # le as the collector's exporter wrote it: the same text as the agent's /metrics
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k[0].startswith("sum:"):
            assert round(got[k] * 1e6) == round(v * 1e6), k  # integer microseconds, exactly
        else:
            assert got[k] == v, k


def test_every_observation_is_in_the_delay_lines_bucket(run: Run) -> None:
    r, agent, _, _ = run
    obs = observations(agent.flows_of(r))
    # each side's smoothed RTT at close, as its own socket reports it: the delay plus the lab's base
    assert r.up_rtt_us >= DELAY_S * 1e6 and r.down_rtt_us >= DELAY_S * 1e6, (r.up_rtt_us, r.down_rtt_us)
    want = bucket(round(DELAY_S * 1e6))
    assert bucket(r.up_rtt_us) == want and bucket(r.down_rtt_us) == want, (r.up_rtt_us, r.down_rtt_us)
    assert {bucket(us) for _, us in obs} == {want}, sorted(obs)
    assert all(us >= DELAY_S * 1e6 for _, us in obs), sorted(obs)


def test_agents_own_metrics_show_the_same_histogram(run: Run) -> None:
    r, agent, scraped, _ = run
    want = expected(observations(agent.flows_of(r)))
    got: dict[tuple[str, str], float] = {}
    for line in scraped.splitlines():
        if not line.startswith("otelflow_tcp_rtt_seconds_") or f'server_port="{PORT}"' not in line:
            continue
        name, _, value = line.rpartition(" ")
        base, _, labels = name.partition("{")
        kv = dict(p.split("=", 1) for p in labels.rstrip("}").split('",') if "=" in p)
        kv = {k: v.strip('"') for k, v in kv.items()}
        src = kv.get("source_k8s_workload_name") or kv.get("source_otelflow_peer_class", "")
        got[(f"{base.removeprefix('otelflow_tcp_rtt_seconds_')}:{src}", kv.get("le", ""))] = float(value)
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k[0].startswith("sum:"):
            assert round(got[k] * 1e6) == round(v * 1e6), k
        else:
            assert got[k] == v, k
