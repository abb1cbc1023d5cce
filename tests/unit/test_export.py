"""Aggregation, OTLP encoding (checked with the official protos) and the exporter's behaviour against
local receivers that answer as a collector would (success, retryable and permanent failures)."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as lpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb

from otelflow.aggregate import OVERFLOW_KEY, Aggregator
from otelflow.config import OtlpConfig
from otelflow.decorate import DecoratedFlow
from otelflow.flow import FlowDelta
from otelflow.meta.model import Peer
from otelflow.otlp import encode as pb
from otelflow.otlp.exporter import Item, OtlpExporter, partial_success, retry_info_delay
from otelflow.otlp.logs import LogFilter, LogsEncoder
from otelflow.otlp.metrics import MetricsEncoder
from otelflow.promexp import render
from tests.unit.flows import BE, EXT, FE, SVC, delta


def dec(
    f: FlowDelta | None = None, client: Peer = FE, server: Peer = BE, c2s: bool = True, s2c: bool = True
) -> DecoratedFlow:
    return DecoratedFlow(f or delta(), client, server, SVC, c2s, s2c)


def totals(agg: Aggregator, metric: str) -> dict[tuple[tuple[str, Any], ...], int]:
    return {agg.pairs(s): s.total for s in agg.snapshot()[metric]}


def test_directions_become_source_destination_and_count_once_applies() -> None:
    agg = Aggregator()
    agg.add(
        [dec(c2s=True, s2c=False), dec(delta(bytes_c2s=7, packets_c2s=1, opened=False), c2s=True, s2c=True)]
    )
    by = totals(agg, "otelflow.flow.bytes")
    fe_to_be = next(k for k in by if ("source.k8s.workload.name", "fe") in k)
    be_to_fe = next(k for k in by if ("source.k8s.workload.name", "be") in k)
    assert by[fe_to_be] == 107  # both records own client->server
    assert by[be_to_fe] == 1000  # only the second owns server->client
    attrs = dict(fe_to_be)
    assert attrs["destination.k8s.statefulset.name"] == "be" and attrs["source.k8s.deployment.name"] == "fe"
    assert (
        attrs["source.cloud.availability_zone"] == "a" and attrs["destination.otelflow.peer.class"] == "pod"
    )
    assert (
        attrs["server.port"] == 8080 and attrs["network.type"] == "ipv4" and attrs["k8s.service.name"] == "be"
    )
    assert "source.k8s.pod.name" not in attrs  # workload level
    assert not any(v == 40000 for v in attrs.values())  # the ephemeral client port never appears
    assert sum(totals(agg, "otelflow.flow.interzone.bytes").values()) == 1107  # zones a and b differ


def test_connections_opened_closed_active() -> None:
    agg = Aggregator()
    agg.add([dec(), dec(delta(opened=False, closed=True, bytes_c2s=0))])
    assert sum(totals(agg, "otelflow.connections.opened").values()) == 1
    assert sum(totals(agg, "otelflow.connections.closed").values()) == 1
    assert sum(totals(agg, "otelflow.connections.active").values()) == 0
    agg.add([dec(c2s=False)])  # not this node's connection
    assert sum(totals(agg, "otelflow.connections.opened").values()) == 1


def test_levels_include_exclude() -> None:
    pod = Aggregator(level="pod")
    pod.add([dec()])
    k = next(iter(totals(pod, "otelflow.flow.bytes")))
    assert ("source.k8s.pod.name", "fe-1") in k and ("source.k8s.node.name", "n1") in k
    flow = Aggregator(level="flow", exclude=["source.address", "destination.address"])
    flow.add([dec()])
    keys = {kk for k in totals(flow, "otelflow.flow.bytes") for kk, _ in k}
    assert "source.k8s.pod.uid" in keys and "source.address" not in keys
    inc = Aggregator(include=["source.k8s.node.name"], exclude=["server.port"])
    inc.add([dec()])
    keys = {kk for k in totals(inc, "otelflow.flow.bytes") for kk, _ in k}
    assert "source.k8s.node.name" in keys and "server.port" not in keys


def test_external_peers_are_classified_never_addressed() -> None:
    agg = Aggregator(level="flow")
    agg.add([dec(delta(server_ip="8.8.8.8"), server=EXT)])
    for k in totals(agg, "otelflow.flow.bytes"):
        assert "8.8.8.8" not in dict(k).values()
        assert ("destination.otelflow.peer.class", "public") in k or (
            "source.otelflow.peer.class",
            "public",
        ) in k


def test_cardinality_cap_and_overflow_series() -> None:
    agg = Aggregator(level="pod", max_series=3)
    batch = [
        dec(client=Peer("pod", "pod", node="n1", namespace="ns", name=f"p{i}"), s2c=False) for i in range(10)
    ]
    agg.add(batch)
    series = agg.snapshot()["otelflow.flow.bytes"]
    assert len(series) == 4
    over = [s for s in series if agg.pairs(s) == ((OVERFLOW_KEY, "true"),)]
    assert len(over) == 1 and over[0].total == 700
    assert sum(s.total for s in series) == 1000  # nothing lost, only folded
    assert agg.stats.overflow_points >= 7


def test_idle_series_expire() -> None:
    agg = Aggregator(idle_intervals=2)
    agg.add([dec(delta(opened=False))])
    for _ in range(3):
        agg.end_interval()
    assert agg.snapshot()["otelflow.flow.bytes"] == [] and agg.stats.expired_series > 0


def decode_metrics(items: list[Item]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for it in items:
        req = mpb.ExportMetricsServiceRequest.FromString(it.body)
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.setdefault(m.name, []).extend([(m, dp) for dp in m.sum.data_points])
    return out


def test_metrics_encoding_cumulative_and_delta() -> None:
    agg = Aggregator()
    agg.add([dec()])
    cum = MetricsEncoder([("service.name", "otelflow")], "otelflow", "1")
    dlt = MetricsEncoder([("service.name", "otelflow")], "otelflow", "1", temporality="delta")
    first = decode_metrics(cum.encode(agg.snapshot(), 10))
    d1 = decode_metrics(dlt.encode(agg.snapshot(), 10))
    agg.end_interval()
    agg.add([dec(delta(opened=False, bytes_c2s=5, bytes_s2c=0))])
    second = decode_metrics(cum.encode(agg.snapshot(), 20))
    d2 = decode_metrics(dlt.encode(agg.snapshot(), 20))
    m, _ = first["otelflow.flow.bytes"][0]
    assert m.unit == "By" and m.sum.is_monotonic and m.sum.aggregation_temporality == 2
    assert sorted(dp.as_int for _, dp in first["otelflow.flow.bytes"]) == [100, 1000]
    assert sorted(dp.as_int for _, dp in second["otelflow.flow.bytes"]) == [105, 1000]
    assert sorted(dp.as_int for _, dp in d1["otelflow.flow.bytes"]) == [100, 1000]
    assert [dp.as_int for _, dp in d2["otelflow.flow.bytes"]] == [5]  # only what changed
    assert d2["otelflow.flow.bytes"][0][0].sum.aggregation_temporality == 1
    active = first["otelflow.connections.active"][0][0]
    assert not active.sum.is_monotonic and active.sum.aggregation_temporality == 2


def test_requests_stay_under_the_limit_and_lose_nothing() -> None:
    agg = Aggregator(level="pod", max_series=100_000)
    agg.add(
        [
            dec(client=Peer("pod", "pod", node="n1", namespace="ns", name=f"pod-{i:05d}"), s2c=False)
            for i in range(5000)
        ]
    )
    enc = MetricsEncoder([("service.name", "otelflow")], "otelflow", "1", max_request_bytes=200_000)
    items = enc.encode(agg.snapshot(), 1)
    assert len(items) > 3 and all(len(i.body) <= 200_000 for i in items)
    got = decode_metrics(items)
    assert sum(dp.as_int for _, dp in got["otelflow.flow.bytes"]) == 5000 * 100
    assert sum(i.count for i in items) == sum(len(v) for v in got.values())


def test_flow_logs() -> None:
    enc = LogsEncoder([("service.name", "otelflow")], "otelflow", "1")
    items = enc.encode([dec(), dec(c2s=False)], now_ns=5)
    req = lpb.ExportLogsServiceRequest.FromString(items[0].body)
    [rec] = req.resource_logs[0].scope_logs[0].log_records  # the second is the other node's to log
    attrs = {kv.key: (kv.value.string_value or kv.value.int_value) for kv in rec.attributes}
    assert rec.event_name == "otelflow.flow"
    assert attrs["client.address"] == "10.1.1.2" and attrs["client.port"] == 40000
    assert attrs["server.k8s.workload.name"] == "be" and attrs["otelflow.flow.bytes.s2c"] == 1000
    assert attrs["otelflow.nat.dialed.address"] == "10.96.0.10" and attrs["k8s.service.name"] == "be"
    flt = LogsEncoder([], "o", "1", LogFilter(namespaces=frozenset({"other"})))
    assert flt.encode([dec()]) == [] and flt.filtered == 1
    sampled = LogsEncoder([], "o", "1", LogFilter(sample=0.5))
    kept = [bool(sampled.encode([dec(delta(flow_id=str(i)))])) for i in range(400)]
    assert 120 < sum(kept) < 280
    assert kept == [bool(sampled.encode([dec(delta(flow_id=str(i)))])) for i in range(400)]  # consistent


def test_prometheus_rendering() -> None:
    agg = Aggregator()
    agg.add([dec()])
    text = render(agg.snapshot(), agg.pairs)
    assert "# TYPE otelflow_flow_bytes_total counter" in text
    assert 'source_k8s_workload_name="fe"' in text and "otelflow_connections_active{" in text


def test_response_decoding() -> None:
    resp = mpb.ExportMetricsServiceResponse()
    resp.partial_success.rejected_data_points = 3
    resp.partial_success.error_message = "bad points"
    assert partial_success(resp.SerializeToString()) == (3, "bad points")
    assert partial_success(b"") == (0, "")
    assert retry_info_delay(_retry_status(2)) == 2.0  # google.rpc.Status{code: 8, details: [RetryInfo]}
    assert retry_info_delay(b"\x08\x08") is None


# ---- exporter against local receivers ------------------------------------------------------------
class Recorder:
    def __init__(self, script: list[int], retry_after: str | None = None, partial: int = 0) -> None:
        self.script = script  # HTTP status per request, then 200
        self.retry_after = retry_after
        self.partial = partial
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []


@pytest.fixture()
def http_receiver() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder([])

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_POST(self) -> None:
            n = int(self.headers["Content-Length"])
            body = self.rfile.read(n)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            rec.bodies.append(body)
            rec.headers.append(dict(self.headers))
            rec.times.append(time.monotonic())
            code = rec.script.pop(0) if rec.script else 200
            resp = b""
            if code == 200 and rec.partial:
                r = mpb.ExportMetricsServiceResponse()
                r.partial_success.rejected_data_points = rec.partial
                resp = r.SerializeToString()
            self.send_response(code)
            if rec.retry_after and code != 200:
                self.send_header("Retry-After", rec.retry_after)
            self.send_header("Content-Length", str(len(resp)))
            self.end_headers()
            self.wfile.write(resp)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield rec, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def item(n: int = 1, gen: int = 1, signal: str = "metrics") -> Item:
    body = pb.metrics_request(pb.resource([]), pb.scope("t", "1"), [])
    return Item(signal, body, n, cumulative=signal == "metrics", generation=gen)  # type: ignore[arg-type]


def test_http_retries_retryable_and_honours_retry_after(http_receiver: tuple[Recorder, str]) -> None:
    rec, url = http_receiver
    rec.script, rec.retry_after = [503, 429], "1"
    ex = OtlpExporter(OtlpConfig(endpoint=url, protocol="http/protobuf", headers={"x-tenant": "t1"}))
    ex.submit([item(5)])
    assert ex.flush(20)
    ex.close()
    assert len(rec.bodies) == 3 and ex.stats.retries == 2 and ex.stats.sent_items == 5
    assert rec.times[1] - rec.times[0] >= 0.9  # Retry-After: 1
    assert rec.headers[0]["x-tenant"] == "t1" and rec.headers[0]["Content-Encoding"] == "gzip"
    assert rec.bodies[0] == item().body


def test_http_permanent_error_drops_and_counts(http_receiver: tuple[Recorder, str]) -> None:
    rec, url = http_receiver
    rec.script = [400]
    ex = OtlpExporter(OtlpConfig(endpoint=url, protocol="http/protobuf", compression="none"))
    ex.submit([item(4)])
    ex.close()
    assert len(rec.bodies) == 1 and ex.stats.dropped_items == 4 and ex.stats.by_reason == {"HTTP 400": 4}


def test_http_partial_success_is_counted(http_receiver: tuple[Recorder, str]) -> None:
    rec, url = http_receiver
    rec.partial = 2
    ex = OtlpExporter(OtlpConfig(endpoint=url, protocol="http/protobuf"))
    ex.submit([item(10)])
    ex.close()
    assert ex.stats.rejected_items == 2 and ex.stats.sent_items == 8


def test_collector_away_queue_is_bounded_and_cumulative_snapshots_coalesce() -> None:
    ex = OtlpExporter(
        OtlpConfig(endpoint="http://127.0.0.1:9", protocol="http/protobuf", timeout=0.2),
        max_queue_bytes=400,
    )
    for gen in range(1, 6):
        ex.submit([item(3, gen), item(3, gen)])
    for _ in range(20):
        ex.submit([Item("logs", b"x" * 50, 1)])
    time.sleep(0.3)
    q = list(ex._q)
    assert {i.generation for i in q if i.signal == "metrics"} == {5}  # only the newest snapshot waits
    assert ex.stats.superseded_items >= 24
    assert sum(len(i.body) for i in q) <= 400 and ex.stats.dropped_items > 0  # logs evicted, counted
    assert ex.stats.failed_requests >= 1 and ex.stats.last_error.startswith("connect")
    ex.max_retry_time = 0
    ex.close(timeout=2)


class _Svc(grpc.GenericRpcHandler):
    def __init__(self, codes: list[tuple[grpc.StatusCode, bytes | None]]) -> None:
        self.codes = codes
        self.calls = 0
        self.metadata: list[Any] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        def handle(req: bytes, ctx: grpc.ServicerContext) -> bytes:
            self.calls += 1
            self.metadata.append(dict(ctx.invocation_metadata()))
            if self.codes:
                code, det = self.codes.pop(0)
                if det is not None:
                    ctx.set_trailing_metadata((("grpc-status-details-bin", det),))
                ctx.abort(code, "scripted")
            return b""

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=None, response_serializer=None
        )


def _retry_status(seconds: int) -> bytes:
    ri = pb.ld(1, b"\x08" + pb.varint(seconds))
    return b"\x08\x08" + pb.ld(3, pb.ld(1, b"type.googleapis.com/google.rpc.RetryInfo") + pb.ld(2, ri))


def test_grpc_retry_codes_and_retry_info() -> None:
    svc = _Svc([(grpc.StatusCode.UNAVAILABLE, None), (grpc.StatusCode.RESOURCE_EXHAUSTED, _retry_status(1))])
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[svc])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        ex = OtlpExporter(
            OtlpConfig(endpoint=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer x"})
        )
        ex.submit([item(7)])
        assert ex.flush(20)
        ex.close()
        assert svc.calls == 3 and ex.stats.retries == 2 and ex.stats.sent_items == 7
        assert svc.metadata[0]["authorization"] == "Bearer x"
        # RESOURCE_EXHAUSTED without RetryInfo is not retried
        svc.codes = [(grpc.StatusCode.RESOURCE_EXHAUSTED, None)]
        ex2 = OtlpExporter(OtlpConfig(endpoint=f"http://127.0.0.1:{port}"))
        ex2.submit([item(2)])
        ex2.close()
        assert ex2.stats.dropped_items == 2 and ex2.stats.retries == 0
    finally:
        server.stop(0)


def test_nothing_expires_while_exports_are_not_delivered() -> None:
    agg = Aggregator(idle_intervals=2)
    agg.add([dec(delta(opened=False))])
    for _ in range(5):
        agg.end_interval(expire=False)  # the collector is away: keep everything for the next snapshot
    assert sum(s.total for s in agg.snapshot()["otelflow.flow.bytes"]) == 1100
    for _ in range(3):
        agg.end_interval()
    assert agg.snapshot()["otelflow.flow.bytes"] == []
