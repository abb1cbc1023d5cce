"""The hand-written OTLP encoders, decoded with the official opentelemetry-proto messages and compared
field by field: hand-written expectations for representative flows (NAT, Service, external, node and
host peers, IPv6, no counters, 64-bit counters), the slow reference ``record_attributes`` for a
larger varied input, every LogRecord and NumberDataPoint field, and batching under the size limit.
A broken or missing attribute, a wrong value type or a lost record fails here."""

from __future__ import annotations

import random
from typing import Any

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as lpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.common.v1 import common_pb2

from otelflow.aggregate import Aggregator
from otelflow.decorate import DecoratedFlow
from otelflow.flow import FlowDelta
from otelflow.meta.model import Peer, ServiceMeta
from otelflow.otlp import encode as pb
from otelflow.otlp.exporter import Item
from otelflow.otlp.logs import LogFilter, LogsEncoder, record_attributes
from otelflow.otlp.metrics import MetricsEncoder
from otelflow.schema import METRICS
from tests.unit.flows import BE, EXT, FE, SVC, delta

RESOURCE = [("service.name", "otelflow"), ("k8s.node.name", "n1")]
NOW = 1_700_000_000_123_456_789

BE_MOVED = Peer("pod", "pod", node="n3", zone="c", region="r", namespace="shop", name="be-7", uid="u2",
                workload_name="be", workload_kind="StatefulSet")  # fmt: skip
NODE = Peer("node", "node", node="n2", zone="b", region="r", name="n2")
HOST = Peer("host", "host", zone="dc1", namespace="legacy", name="db-host", workload_name="db",
            workload_kind="Host")  # fmt: skip


def dec(
    f: FlowDelta, client: Peer = FE, server: Peer = BE, svc: ServiceMeta | None = SVC, c2s: bool = True
) -> DecoratedFlow:
    return DecoratedFlow(f, client, server, svc, c2s, True)


def typed(v: common_pb2.AnyValue) -> tuple[str, Any]:
    kind = v.WhichOneof("value")
    return kind, getattr(v, kind)


def attrs(kvs: Any) -> dict[str, tuple[str, Any]]:
    out = {kv.key: typed(kv.value) for kv in kvs}
    assert len(out) == len(kvs), "duplicate attribute keys"
    return out


def s(v: str) -> tuple[str, str]:
    return ("string_value", v)


def i(v: int) -> tuple[str, int]:
    return ("int_value", v)


def reference(d: DecoratedFlow) -> dict[str, tuple[str, Any]]:
    kinds = {int: "int_value", float: "double_value", str: "string_value"}
    return {k: (kinds[type(v)], v) for k, v in record_attributes(d)}


def decode_logs(items: list[Item]) -> list[Any]:
    recs = []
    for it in items:
        assert it.signal == "logs"
        req = lpb.ExportLogsServiceRequest.FromString(it.body)
        assert len(req.resource_logs) == 1
        rl = req.resource_logs[0]
        assert attrs(rl.resource.attributes) == {k: s(v) for k, v in RESOURCE}
        assert len(rl.scope_logs) == 1
        sl = rl.scope_logs[0]
        assert (sl.scope.name, sl.scope.version) == ("otelflow", "9.9")
        assert it.count == len(sl.log_records)
        recs.extend(sl.log_records)
    return recs


def check_record_fields(rec: Any, d: DecoratedFlow) -> None:
    """Every LogRecord field other than the attributes."""
    assert rec.time_unix_nano == int(d.flow.last_seen * 1e9)
    assert rec.observed_time_unix_nano == NOW
    assert rec.severity_number == 9 and rec.severity_text == "INFO"
    assert rec.event_name == "otelflow.flow"
    assert not rec.HasField("body") and rec.flags == 0 and rec.dropped_attributes_count == 0
    assert rec.trace_id == b"" and rec.span_id == b""


PEER_FE = {
    "client.k8s.namespace.name": s("shop"),
    "client.k8s.pod.name": s("fe-1"),
    "client.k8s.pod.uid": s("u1"),
    "client.k8s.workload.name": s("fe"),
    "client.k8s.workload.kind": s("Deployment"),
    "client.k8s.node.name": s("n1"),
    "client.cloud.availability_zone": s("a"),
    "client.cloud.region": s("r"),
    "client.otelflow.peer.class": s("pod"),
}
PEER_BE = {
    "server.k8s.namespace.name": s("shop"),
    "server.k8s.pod.name": s("be-7"),
    "server.k8s.pod.uid": s("u2"),
    "server.k8s.workload.name": s("be"),
    "server.k8s.workload.kind": s("StatefulSet"),
    "server.k8s.node.name": s("n2"),
    "server.cloud.availability_zone": s("b"),
    "server.cloud.region": s("r"),
    "server.otelflow.peer.class": s("pod"),
}

# 1. pod -> Service -> pod (DNAT), opened, counters, TCP state
F1 = dec(delta())
E1 = {
    "client.address": s("10.1.1.2"),
    "client.port": i(40000),
    "server.address": s("10.1.2.3"),
    "server.port": i(8080),
    "network.transport": s("tcp"),
    "network.type": s("ipv4"),
    "otelflow.flow.id": s("n1/1"),
    "otelflow.flow.source": s("conntrack"),
    "otelflow.observer": s("n1"),
    "k8s.service.name": s("be"),
    "otelflow.service.namespace": s("shop"),
    "otelflow.nat.dialed.address": s("10.96.0.10"),
    "otelflow.nat.dialed.port": i(80),
    **PEER_FE,
    **PEER_BE,
    "otelflow.flow.opened": i(1),
    "otelflow.flow.closed": i(0),
    "otelflow.flow.duration_ms": i(1000),
    "otelflow.flow.state": s("ESTABLISHED"),
    "otelflow.flow.bytes.c2s": i(100),
    "otelflow.flow.bytes.s2c": i(1000),
    "otelflow.flow.packets.c2s": i(2),
    "otelflow.flow.packets.s2c": i(3),
}

# 2. pod -> the internet through SNAT, closing, no Service
F2 = dec(
    delta(
        flow_id="2", dialed_ip="203.0.113.9", dialed_port=443, server_ip="203.0.113.9", server_port=443,
        client_nat_ip="192.0.2.7", client_nat_port=61000, dnat=False, snat=True, opened=False,
        closed=True, state="TIME_WAIT", bytes_c2s=0, packets_c2s=0, bytes_s2c=20000, packets_s2c=15,
        first_seen=10.0, last_seen=12.5,
    ),
    server=EXT,
    svc=None,
)  # fmt: skip
E2 = {
    "client.address": s("10.1.1.2"),
    "client.port": i(40000),
    "server.address": s("203.0.113.9"),
    "server.port": i(443),
    "network.transport": s("tcp"),
    "network.type": s("ipv4"),
    "otelflow.flow.id": s("n1/2"),
    "otelflow.flow.source": s("conntrack"),
    "otelflow.observer": s("n1"),
    "otelflow.nat.client.address": s("192.0.2.7"),
    "otelflow.nat.client.port": i(61000),
    **PEER_FE,
    "server.otelflow.peer.class": s("public"),
    "otelflow.flow.opened": i(0),
    "otelflow.flow.closed": i(1),
    "otelflow.flow.duration_ms": i(2500),
    "otelflow.flow.state": s("TIME_WAIT"),
    "otelflow.flow.bytes.c2s": i(0),
    "otelflow.flow.bytes.s2c": i(20000),
    "otelflow.flow.packets.c2s": i(0),
    "otelflow.flow.packets.s2c": i(15),
}

# 3. a host outside Kubernetes -> a node, UDP over IPv6, eBPF source without counters, no state
F3 = dec(
    delta(
        flow_id="77", source="ebpf", family=6, transport="udp", client_ip="fd00::5", client_port=5353,
        dialed_ip="fd00::2", dialed_port=53, server_ip="fd00::2", server_port=53, client_nat_ip="fd00::5",
        client_nat_port=5353, dnat=False, bytes_c2s=None, packets_c2s=None, bytes_s2c=None,
        packets_s2c=None, state=None, first_seen=1.0, last_seen=3.25,
    ),
    client=HOST,
    server=NODE,
    svc=None,
)  # fmt: skip
E3 = {
    "client.address": s("fd00::5"),
    "client.port": i(5353),
    "server.address": s("fd00::2"),
    "server.port": i(53),
    "network.transport": s("udp"),
    "network.type": s("ipv6"),
    "otelflow.flow.id": s("n1/77"),
    "otelflow.flow.source": s("ebpf"),
    "otelflow.observer": s("n1"),
    "client.k8s.namespace.name": s("legacy"),
    "client.k8s.workload.name": s("db"),
    "client.k8s.workload.kind": s("Host"),
    "client.cloud.availability_zone": s("dc1"),
    "client.otelflow.peer.class": s("host"),
    "client.otelflow.peer.name": s("db-host"),
    "server.k8s.node.name": s("n2"),
    "server.cloud.availability_zone": s("b"),
    "server.cloud.region": s("r"),
    "server.otelflow.peer.class": s("node"),
    "server.otelflow.peer.name": s("n2"),
    "otelflow.flow.opened": i(1),
    "otelflow.flow.closed": i(0),
    "otelflow.flow.duration_ms": i(2250),
}

# 4. 64-bit counters, a missing reverse counter, dialed address differing without a DNAT flag
F4 = dec(
    delta(
        flow_id="4", dnat=False, dialed_ip="10.96.0.11", dialed_port=8443, bytes_c2s=5_000_000_000,
        packets_c2s=3_500_000, bytes_s2c=None, packets_s2c=None, opened=False, last_seen=86401.0,
    )
)  # fmt: skip
E4 = {
    **E1,
    "otelflow.flow.id": s("n1/4"),
    "otelflow.nat.dialed.address": s("10.96.0.11"),
    "otelflow.nat.dialed.port": i(8443),
    "otelflow.flow.opened": i(0),
    "otelflow.flow.duration_ms": i(86_400_000),
    "otelflow.flow.bytes.c2s": i(5_000_000_000),
    "otelflow.flow.bytes.s2c": i(0),
    "otelflow.flow.packets.c2s": i(3_500_000),
    "otelflow.flow.packets.s2c": i(0),
}


def test_log_records_decode_to_exactly_the_expected_attributes() -> None:
    enc = LogsEncoder(RESOURCE, "otelflow", "9.9")
    other_node = dec(delta(flow_id="5"), c2s=False)  # the server's node does not log it
    flows = [F1, F2, other_node, F3, F4]
    recs = decode_logs(enc.encode(flows, now_ns=NOW))
    assert len(recs) == 4
    for rec, d, want in zip(recs, [F1, F2, F3, F4], [E1, E2, E3, E4], strict=True):
        check_record_fields(rec, d)
        assert attrs(rec.attributes) == want
        assert reference(d) == want  # the reference spec agrees with the hand-written expectation


def test_flow_across_intervals_peer_change_close_and_reuse() -> None:
    """Per-flow caches must never serve stale content: later records of a flow carry their own
    counters, the Service and peers as decorated now, and a flow id reused after its close starts
    afresh."""
    enc = LogsEncoder(RESOURCE, "otelflow", "9.9")
    seq = [
        [F1],
        [
            dec(
                delta(opened=False, bytes_c2s=7, packets_c2s=1, bytes_s2c=0, packets_s2c=0, last_seen=3.0),
                svc=ServiceMeta("shop", "be-canary", ()),  # the Service appeared or changed meanwhile
            )
        ],
        [dec(delta(opened=False, closed=True, bytes_c2s=1, last_seen=4.0), server=BE_MOVED)],
        [dec(delta(client_port=41000, server_ip="10.1.2.4", last_seen=9.0), client=NODE)],
    ]
    got = [attrs(r.attributes) for batch in seq for r in decode_logs(enc.encode(batch, now_ns=NOW))]
    assert got == [reference(b[0]) for b in seq]
    assert got[1]["otelflow.flow.bytes.c2s"] == i(7) and got[1]["otelflow.flow.duration_ms"] == i(2000)
    assert got[1]["k8s.service.name"] == s("be-canary")
    assert got[2]["server.k8s.node.name"] == s("n3") and got[2]["otelflow.flow.closed"] == i(1)
    assert got[3]["client.port"] == i(41000) and got[3]["server.address"] == s("10.1.2.4")
    assert got[3]["client.otelflow.peer.name"] == s("n2") and "client.k8s.pod.name" not in got[3]


def _varied(n: int, seed: int = 3) -> list[DecoratedFlow]:
    """n records of n // 3 flows: a flow keeps its tuple, NAT, peers and Service; every record has
    its own counters, flags, state and times."""
    r = random.Random(seed)
    peers = [FE, BE, BE_MOVED, EXT, NODE, HOST, Peer("external", "private")]
    svcs = [SVC, None, ServiceMeta("kube-system", "dns", ())]
    flows = []
    for k in range(max(1, n // 3)):
        ident = dict(
            flow_id=str(k), source=r.choice(["conntrack", "ebpf"]), observer=r.choice(["n1", "n2"]),
            family=r.choice([4, 6]), transport=r.choice(["tcp", "udp"]),
            client_ip=f"10.0.{r.randrange(4)}.{r.randrange(256)}", client_port=r.randrange(65536),
            dialed_ip=r.choice(["10.96.0.10", "10.0.0.9"]), dialed_port=r.choice([80, 53, 8080]),
            server_ip=r.choice(["10.0.0.9", "10.0.1.1"]), server_port=r.choice([80, 53, 8080]),
            client_nat_ip=r.choice(["10.0.0.1", "192.0.2.1"]), client_nat_port=r.randrange(65536),
            dnat=r.random() < 0.5, snat=r.random() < 0.3,
        )  # fmt: skip
        flows.append((ident, r.choice(peers), r.choice(peers), r.choice(svcs), r.random() < 0.9))
    out = []
    for k in range(n):
        ident, client, server, svc, c2s = r.choice(flows)
        big = r.random() < 0.1
        has = r.random() < 0.8
        f = delta(
            **ident,
            bytes_c2s=r.randrange(1 << 40 if big else 1 << 16) if has else None,
            packets_c2s=r.randrange(1 << 20) if has else None,
            bytes_s2c=r.choice([None, 0, r.randrange(1 << 33)]) if has else None,
            packets_s2c=r.choice([None, r.randrange(100)]) if has else None,
            opened=r.random() < 0.5, closed=r.random() < 0.3,
            state=r.choice([None, "ESTABLISHED", "SYN_SENT"]), first_seen=k * 0.5,
            last_seen=k * 0.5 + r.random() * 100,
        )  # fmt: skip
        out.append(DecoratedFlow(f, client, server, svc, c2s, True))
    return out


def test_varied_flows_match_the_reference_and_batches_stay_under_the_limit() -> None:
    flows = _varied(3000)
    enc = LogsEncoder(RESOURCE, "otelflow", "9.9", max_request_bytes=60_000)
    items = enc.encode(flows, now_ns=NOW)
    assert len(items) > 5 and all(len(it.body) <= 60_000 for it in items)
    logged = [d for d in flows if d.count_conn]
    recs = decode_logs(items)
    assert len(recs) == len(logged)
    for rec, d in zip(recs, logged, strict=True):
        check_record_fields(rec, d)
        assert attrs(rec.attributes) == reference(d)
    # the same input again (every cache warm) encodes to the same bytes but for nothing
    again = LogsEncoder(RESOURCE, "otelflow", "9.9", max_request_bytes=60_000)
    assert [it.body for it in again.encode(flows, now_ns=NOW)] == [it.body for it in items]


def test_filters_and_sampling_decide_which_records_go_out() -> None:
    flows = [F1, F2, F3, F4]
    cls = LogsEncoder(RESOURCE, "otelflow", "9.9", LogFilter(classes=frozenset({"public", "host"})))
    got = decode_logs(cls.encode(flows, now_ns=NOW))
    assert [attrs(r.attributes)["otelflow.flow.id"] for r in got] == [s("n1/2"), s("n1/77")]
    assert cls.filtered == 2
    small = dec(delta(flow_id="9", opened=False, bytes_c2s=10, bytes_s2c=5))
    big = dec(delta(flow_id="10", opened=False, bytes_c2s=600, bytes_s2c=500))
    mb = LogsEncoder(RESOURCE, "otelflow", "9.9", LogFilter(min_bytes=1000))
    got = decode_logs(mb.encode([small, big, F2, F3], now_ns=NOW))  # F2 closes, F3 opens: kept
    assert [attrs(r.attributes)["otelflow.flow.id"] for r in got] == [s("n1/10"), s("n1/2"), s("n1/77")]
    assert mb.filtered == 1
    ns = LogsEncoder(RESOURCE, "otelflow", "9.9", LogFilter(namespaces=frozenset({"legacy"})))
    assert [attrs(r.attributes) for r in decode_logs(ns.encode(flows, now_ns=NOW))] == [E3]
    sampled = LogsEncoder(RESOURCE, "otelflow", "9.9", LogFilter(sample=0.5))
    varied = _varied(2000)
    kept = decode_logs(sampled.encode(varied, now_ns=NOW))
    ids = {attrs(r.attributes)["otelflow.flow.id"][1] for r in kept}
    assert sampled.filtered + len(kept) == sum(d.count_conn for d in varied)
    for d in varied:  # consistent per flow: every record of a flow is kept, or none
        if d.count_conn:
            fid = f"{d.flow.observer}/{d.flow.flow_id}"
            assert (fid in ids) == LogFilter(sample=0.5).keep(d)


def test_metric_points_decode_to_the_series_attributes_and_totals() -> None:
    agg = Aggregator(level="workload", clock_ns=lambda: 1234)
    flows = [F1, F2, F3, F4, *_varied(500)]
    agg.add(flows)
    snap = agg.snapshot()
    enc = MetricsEncoder(RESOURCE, "otelflow", "9.9", max_request_bytes=20_000)
    items = enc.encode(snap, NOW)
    assert len(items) > 3 and all(len(it.body) <= 20_000 for it in items)
    defs = {m.name: m for m in METRICS}
    got: dict[str, list[tuple[dict[str, tuple[str, Any]], int, int, int]]] = {}
    for it in items:
        req = mpb.ExportMetricsServiceRequest.FromString(it.body)
        [rm] = req.resource_metrics
        assert attrs(rm.resource.attributes) == {k: s(v) for k, v in RESOURCE}
        [sm] = rm.scope_metrics
        assert (sm.scope.name, sm.scope.version) == ("otelflow", "9.9")
        assert it.count == sum(len(m.sum.data_points) for m in sm.metrics)
        for m in sm.metrics:
            d = defs[m.name]
            assert (m.description, m.unit, m.WhichOneof("data")) == (d.brief, d.unit, "sum")
            assert m.sum.aggregation_temporality == 2 and m.sum.is_monotonic == (d.kind == "counter")
            for p in m.sum.data_points:
                assert p.WhichOneof("value") == "as_int" and p.flags == 0 and not p.exemplars
                got.setdefault(m.name, []).append(
                    (attrs(p.attributes), p.as_int, p.start_time_unix_nano, p.time_unix_nano)
                )

    def key(row: tuple[dict[str, Any], int, int, int]) -> str:
        return repr(sorted(row[0].items()))

    for name, series in snap.items():
        want = [
            ({k: i(v) if isinstance(v, int) else s(v) for k, v in agg.pairs(x)}, x.total, 1234, NOW)
            for x in series
        ]
        assert sorted(got.get(name, []), key=key) == sorted(want, key=key), name
    c2s = sum(d.flow.bytes_c2s or 0 for d in flows if d.count_c2s)
    s2c = sum(d.flow.bytes_s2c or 0 for d in flows if d.count_s2c)
    assert sum(p[1] for p in got["otelflow.flow.bytes"]) == c2s + s2c


def test_varints_and_length_prefixes_round_trip() -> None:
    for n in [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28, 2**35 + 5, 2**63 - 1, 2**64 - 1]:
        v = common_pb2.AnyValue.FromString(b"\x18" + pb.varint(n))
        assert v.int_value == (n if n < 2**63 else n - 2**64)
    assert common_pb2.AnyValue.FromString(b"\x18" + pb.varint(-5)).int_value == -5
    long = "x" * 20_000
    assert common_pb2.AnyValue.FromString(pb.ld(1, long.encode())).string_value == long


def test_pre_framed_keys_encode_like_the_generic_encoder() -> None:
    ints = [0, 1, 127, 128, 16383, 16384, 2**21, 2**28 - 1, 2**28, 2**40 + 3, 2**63 - 1, -1, -(2**40)]
    strs = ["", "a", "10.1.2.3", "fd00::1", "ünïcode-名前", "x" * 127, "y" * 255, "z" * 256, "w" * 70_000]
    for name in ("k", "otelflow.flow.bytes.c2s", "k" * 300):
        key = pb.Key(6, name)
        for v in ints:
            assert key.of_int(v) == pb.ld(6, pb.keyvalue(name, v)), (name, v)
        for sv in strs:
            assert key.of_str(sv) == pb.ld(6, pb.keyvalue(name, sv)), (name, sv[:20])
    names = ["a", "otelflow.flow.packets.s2c", "b"]
    several = pb.IntKeys(6, names)
    for v in ints:
        vals = [v, v // 3, max(v, 0) + 1]
        want = b"".join(pb.ld(6, pb.keyvalue(n, x)) for n, x in zip(names, vals, strict=True))
        assert b"".join(several.fragments(vals)) == want, v


def test_aggregation_of_missing_and_zero_counters_and_connections() -> None:
    """No counters (None): no bytes/packets series, connections still counted; a zero delta keeps
    (creates) the series at its total; inter-zone bytes only between two known, different zones."""
    agg = Aggregator(level="workload", clock_ns=lambda: 7)
    none = delta(bytes_c2s=None, packets_c2s=None, bytes_s2c=None, packets_s2c=None)
    zero = delta(flow_id="2", bytes_c2s=0, packets_c2s=0, bytes_s2c=5, packets_s2c=1, opened=False)
    closing = delta(flow_id="3", opened=False, closed=True)
    same_zone = delta(flow_id="4", opened=False)
    agg.add([dec(none), dec(zero), dec(closing), dec(same_zone, server=FE), dec(delta(), server=EXT)])
    snap = agg.snapshot()

    def by_source(metric: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for x in snap[metric]:
            pairs = dict(agg.pairs(x))
            src = pairs.get("source.k8s.workload.name", "-")
            dst = pairs.get("destination.k8s.workload.name", "-")
            out[f"{src}>{dst}"] = out.get(f"{src}>{dst}", 0) + x.total
        return out

    # "none" adds no bytes; "zero" adds 0 (the series exists); the external server has no workload
    assert by_source("otelflow.flow.bytes") == {"fe>be": 0 + 100, "be>fe": 5 + 1000, "fe>fe": 100 + 1000,
                                                "fe>-": 100, "->fe": 1000}  # fmt: skip
    assert by_source("otelflow.flow.packets") == {"fe>be": 0 + 2, "be>fe": 1 + 3, "fe>fe": 2 + 3, "fe>-": 2,
                                                  "->fe": 3}  # fmt: skip
    assert by_source("otelflow.flow.interzone.bytes") == {"fe>be": 100, "be>fe": 5 + 1000}  # EXT: no zone
    assert by_source("otelflow.connections.opened") == {"fe>be": 1, "fe>-": 1}
    assert by_source("otelflow.connections.closed") == {"fe>be": 1, "fe>-": 0}
    assert by_source("otelflow.connections.active") == {"fe>be": 0, "fe>-": 1}
    assert agg.stats.records == 5
