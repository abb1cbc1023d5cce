"""Flow logs with TCP health through a real OpenTelemetry Collector, gzip over both transports.

An agent on the eBPF source (TCP health from tracepoints) runs on a node whose receiving pod drops
5% of the data segments, and exports to a real collector: once over OTLP/gRPC (gzip in grpc core)
and once over OTLP/HTTP (gzip at export.otlp.compression_level 1, the default). The collector's
file exporter must hold log records whose retransmits per direction sum to what each socket says
it retransmitted (TCP_INFO tcpi_total_retrans), whose bytes equal the kernel's count, and whose TCP
health attributes equal the agent's own flow deltas record by record (RTT as seconds). Retransmits
may fall short of the sockets' count only by the events the agent reports lost
(otelflow_agent_ebpf_health_lost_events_total, read from its /metrics and its exit warning)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelflow.netlab import ns as nsu
from otelflow.netlab.agents import agents, truth
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import NodeSpec, PodSpec, ServiceSpec, Topology
from otelflow.netlab.traffic import FlowSpec, TrafficGenerator
from tests.e2e.components import Collector
from tests.kernel.test_ebpf_source import LOSS, lost_retransmits, metrics_of, within_loss

HEALTH = ("retransmits_c2s", "retransmits_s2c", "resets_c2s", "resets_s2c")


@pytest.fixture(scope="module")
def lossy() -> Iterator[tuple[Lab, str]]:
    t = Topology(
        nodes=(NodeSpec("n1"),),
        pods=(PodSpec("a", "n1"), PodSpec("b", "n1")),
        services=(ServiceSpec("s", 80, 8080, ("b",)),),
    )
    with Lab(t) as lab:
        nsu.nft_apply(lab.endpoint("b").netns, LOSS)  # drops 5% of the data segments to port 9500
        yield lab, str(lab.topology.router_ip(4))


@pytest.mark.parametrize(("protocol", "port"), [("grpc", 4317), ("http/protobuf", 4318)])
def test_logged_retransmits_equal_the_sockets_own_count(
    lossy: tuple[Lab, str], collector_bin: str, tmp_path: Path, protocol: str, port: int
) -> None:
    lab, ip = lossy
    col = Collector(collector_bin, lab.names.router(), ip, tmp_path)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{ip}:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
    }
    col.start()
    try:
        with agents(lab, ["n1"], poll=0.5, source="ebpf", extra_env=env) as runs:
            [r] = TrafficGenerator(lab).run([FlowSpec("a", "b", up=2_000_000, down=300_000, port=9500)])
            time.sleep(1.5)  # a poll after the close; the agent exports once more on exit
            text = metrics_of(lab, "n1")
        deltas = runs["n1"].flows_of(r)
        recs = wait_records(col, r.client_port, len(deltas))
    finally:
        col.stop()
    run = runs["n1"]
    assert run.proc.returncode == 0 and "export failed" not in run.stderr, run.stderr[-2000:]
    assert r.ok, r.error
    assert r.up_retransmits > 0, "the loss rule made no retransmission"
    # the records the collector received: the bytes and the retransmits of each direction, exact
    got = (
        sum(x.get("otelflow.flow.bytes.c2s", 0) for x in recs),
        sum(x.get("otelflow.flow.packets.c2s", 0) for x in recs),
        sum(x.get("otelflow.flow.bytes.s2c", 0) for x in recs),
        sum(x.get("otelflow.flow.packets.s2c", 0) for x in recs),
    )
    assert got == truth(r)
    lost = lost_retransmits(text, run.stderr)
    c2s = sum(x["otelflow.tcp.retransmits.c2s"] for x in recs)
    s2c = sum(x["otelflow.tcp.retransmits.s2c"] for x in recs)
    within_loss(c2s, r.up_retransmits, lost, "retransmits c2s")
    within_loss(s2c, r.down_retransmits, lost, "retransmits s2c")
    within_loss(c2s + s2c, r.up_retransmits + r.down_retransmits, lost, "retransmits")
    assert sum(x["otelflow.tcp.resets.c2s"] + x["otelflow.tcp.resets.s2c"] for x in recs) == 0
    # record by record, the health the agent computed (its JSON deltas) is what arrived
    assert sorted(map(health_of_record, recs)) == sorted(map(health_of_delta, deltas))
    assert any("otelflow.tcp.rtt.c2s" in x for x in recs)  # the client's socket measured its RTT


def wait_records(
    col: Collector, client_port: int, deltas: int, timeout: float = 15.0
) -> list[dict[str, Any]]:
    """The flow's records, once all ``deltas`` of them (one per flow delta the agent logged, the
    closing one and any after it) have been written (the file exporter is batched)."""
    deadline = time.monotonic() + timeout
    while True:
        recs = [x for x in col.log_records() if x.get("client.port") == client_port]
        done = len(recs) >= deltas and any(x.get("otelflow.flow.closed") == 1 for x in recs)
        if done or time.monotonic() > deadline:
            return recs
        time.sleep(0.3)


def health_of_record(x: dict[str, Any]) -> tuple[Any, ...]:
    ints = tuple(x.get(f"otelflow.tcp.{k.replace('_', '.')}") for k in HEALTH)
    return (*ints, x.get("otelflow.tcp.rtt.c2s", -1.0), x.get("otelflow.tcp.rtt.s2c", -1.0))


def health_of_delta(x: dict[str, Any]) -> tuple[Any, ...]:
    rtt = tuple(-1.0 if x[k] is None else x[k] / 1e6 for k in ("rtt_us_c2s", "rtt_us_s2c"))
    return (*(x[k] for k in HEALTH), *rtt)
