#!/usr/bin/env python3
"""Benchmark: one export interval of N decorated flows (default 100k) through otelflow's path and
through the OpenTelemetry Python SDK, in the same run, each path in a fresh child process (so peak
RSS is each path's own), the children alternating (otelflow, SDK, otelflow, SDK, ...) so machine
drift hits both; medians over the rounds.

otelflow "encode" CPU (the issue's <= 1 s target) covers what the export stage does per interval:
Aggregator.add at workload level (count-once, every metric) + snapshot + MetricsEncoder.encode
(cumulative) + LogsEncoder.encode (one log record per flow, default filter) + end_interval, producing
the ExportMetricsServiceRequest / ExportLogsServiceRequest bytes, split under the 3 MiB limit.
otelflow "export" CPU is then the same requests through the agent's exporter as configured by
default (gRPC, gzip: grpc core compresses with zlib's default level 6) to a loopback gRPC sink in
another process (its CPU is not counted), and through the README's alternatives: gRPC without
compression, and OTLP/HTTP with gzip at level 1 (export.otlp.compression_level's default) to a
loopback HTTP sink (in the sink's process too); "gzip -6" / "gzip -1" are zlib alone on the same bytes,
for reference. Two intervals are timed: the first (every series and flow new: cold) and the second
(the same flows with new deltas: the steady state after the first interval, reported as "warm").
SDK path: Counter.add per flow (bytes, packets, connections) with the same attribute sets, then
InMemoryMetricReader collect + the SDK's own OTLP protobuf encoder (encode_metrics); LoggerProvider
emit per flow + SimpleLogRecordProcessor into memory + encode_logs (no transport: the ratio compares
encode with encode).

Usage: python bench/otlp_encode.py [--flows 100000] [--rounds 3] [--shape realistic|unique]
[--source conntrack|ebpf] [--no-sdk]. ``--source ebpf`` gives the flows what the eBPF source gives
them: TCP health on every flow (retransmits and resets per direction, mostly 0; an RTT sample per
direction on most flows: the sockets that sent in the interval) and a last_seen per flow (the time
of its last packet, where conntrack flows share the poll's time). Prints per round and as medians: CPU seconds per path, the ratio SDK/otelflow (> 1:
otelflow is cheaper), points/s, records/s, bytes with and without gzip, peak RSS. Needs
opentelemetry-sdk and opentelemetry-exporter-otlp-proto-common (benchmark only).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from otelflow.decorate import DecoratedFlow
from otelflow.flow import FlowDelta
from otelflow.meta.model import Peer, ServiceMeta

RESOURCE = [("service.name", "otelflow"), ("k8s.node.name", "node-1"), ("k8s.cluster.name", "bench")]


def make_flows(
    n: int, seed: int = 7, shape: str = "realistic", source: str = "conntrack"
) -> list[DecoratedFlow]:
    """n flows in 30 namespaces and 3 zones.

    realistic: 2,500 pods of 250 workloads; each workload calls 3 fixed dependencies on fixed ports
    (a service graph), so workload-level aggregation folds the flows into ~10^4 series.
    unique: ~n/4 pods of ~n/20 workloads talking at random: nearly every flow its own attribute set
    (the worst case for any aggregator)."""
    r = random.Random(seed)
    flows = _service_graph(n, r) if shape == "realistic" else _unique(n, r)
    if source == "ebpf":
        for d in flows:
            f = d.flow
            f.source = "ebpf"
            f.last_seen = 2.0 - r.random() * 0.5  # each flow's last packet
            lossy = r.random() < 0.05
            f.retransmits_c2s = r.randint(1, 40) if lossy else 0
            f.retransmits_s2c = r.randint(0, 5) if lossy else 0
            f.resets_c2s, f.resets_s2c = 0, int(f.closed and r.random() < 0.1)
            f.rtt_us_c2s = r.randint(40, 20_000) if r.random() < 0.9 else None
            f.rtt_us_s2c = r.randint(40, 20_000) if r.random() < 0.9 else None
    return flows


def _unique(n: int, r: random.Random) -> list[DecoratedFlow]:
    zones = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    nss = [f"team-{i}" for i in range(30)]
    kinds = ["Deployment", "StatefulSet", "DaemonSet", "Job"]
    workloads = [(r.choice(nss), f"svc-{i}", r.choice(kinds)) for i in range(max(10, n // 20))]
    pods = []
    for i in range(max(20, n // 4)):
        ns, wl, kind = r.choice(workloads)
        node = f"node-{r.randrange(50)}"
        pods.append(Peer("pod", "pod", node=node, zone=zones[int(node[5:]) % 3], region="eu-west-1", namespace=ns,
                         name=f"{wl}-{i}", uid=f"uid-{i}", workload_name=wl, workload_kind=kind))  # fmt: skip
    ports = [53, 80, 443, 5432, 6379, 8080, 9090]
    out = []
    for i in range(n):
        c, s = r.choice(pods), r.choice(pods)
        b = r.randint(100, 2_000_000)
        f = FlowDelta(
            flow_id=str(i), source="conntrack", observer="node-1", family=4, transport="tcp",
            client_ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", client_port=30000 + i % 30000,
            dialed_ip="10.96.0.10", dialed_port=80, server_ip="10.2.0.1", server_port=r.choice(ports),
            client_nat_ip="10.1.0.1", client_nat_port=1, dnat=True, snat=False,
            bytes_c2s=b, packets_c2s=b // 1400 + 1, bytes_s2c=b // 3, packets_s2c=b // 4200 + 1,
            opened=r.random() < 0.3, closed=r.random() < 0.2, state="ESTABLISHED", first_seen=1.0, last_seen=2.0,
        )  # fmt: skip
        out.append(DecoratedFlow(f, c, s, ServiceMeta(s.namespace, s.workload_name, ()), True, True))
    return out


def _service_graph(n: int, r: random.Random) -> list[DecoratedFlow]:
    zones = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
    kinds = ["Deployment", "StatefulSet", "DaemonSet", "Job"]
    wls = [
        (f"team-{i % 30}", f"svc-{i}", kinds[i % 4], [53, 80, 443, 5432, 6379, 8080, 9090][i % 7])
        for i in range(250)
    ]
    deps = {i: r.sample(range(250), 3) for i in range(250)}
    pods: dict[int, list[Peer]] = {}
    for i, (ns, wl, kind, _) in enumerate(wls):
        pods[i] = [
            Peer("pod", "pod", node=f"node-{(i * 10 + k) % 50}", zone=zones[(i + k) % 3], region="eu-west-1",
                 namespace=ns, name=f"{wl}-{k}", uid=f"uid-{i}-{k}", workload_name=wl, workload_kind=kind)
            for k in range(10)
        ]  # fmt: skip
    out = []
    for j in range(n):
        a = r.randrange(250)
        b = r.choice(deps[a])
        c, s = r.choice(pods[a]), r.choice(pods[b])
        nbytes = r.randint(100, 2_000_000)
        f = FlowDelta(
            flow_id=str(j), source="conntrack", observer="node-1", family=4, transport="tcp",
            client_ip=f"10.{j >> 16 & 255}.{j >> 8 & 255}.{j & 255}", client_port=30000 + j % 30000,
            dialed_ip="10.96.0.10", dialed_port=wls[b][3], server_ip="10.2.0.1", server_port=wls[b][3],
            client_nat_ip="10.1.0.1", client_nat_port=1, dnat=True, snat=False,
            bytes_c2s=nbytes, packets_c2s=nbytes // 1400 + 1, bytes_s2c=nbytes // 3, packets_s2c=nbytes // 4200 + 1,
            opened=r.random() < 0.3, closed=r.random() < 0.2, state="ESTABLISHED", first_seen=1.0, last_seen=2.0,
        )  # fmt: skip
        out.append(DecoratedFlow(f, c, s, ServiceMeta(s.namespace, s.workload_name, ()), True, True))
    return out


def run_otelflow(flows: list[DecoratedFlow], sink: str) -> dict[str, float]:
    from otelflow.aggregate import Aggregator
    from otelflow.config import OtlpConfig
    from otelflow.otlp.exporter import Item, OtlpExporter
    from otelflow.otlp.logs import LogsEncoder
    from otelflow.otlp.metrics import MetricsEncoder

    agg = Aggregator(level="workload", max_series=1_000_000)
    menc = MetricsEncoder(RESOURCE, "otelflow", "bench")
    lenc = LogsEncoder(RESOURCE, "otelflow", "bench")
    out: dict[str, float] = {}
    items: list[Item] = []
    logs: list[Item] = []
    for interval in ("cold", "warm"):  # every series and flow new; then the steady state
        items = logs = []  # drop the last interval's requests: an agent holds one interval's
        c0 = time.process_time()
        agg.add(flows)
        c1 = time.process_time()
        items = menc.encode(agg.snapshot(), time.time_ns())
        c2 = time.process_time()
        logs = lenc.encode(flows)
        agg.end_interval()
        c3 = time.process_time()
        out[f"{interval}_cpu"] = c3 - c0
        out[f"{interval}_parts"] = [c1 - c0, c2 - c1, c3 - c2]  # type: ignore[assignment]
    if sink:  # the warm interval's requests through the agent's exporter: as configured by default
        grpc_url, http_url = sink.split(",")  # (gRPC, gzip in grpc core), and the README's alternatives
        for key, cfg in (
            ("warm_export_cpu", OtlpConfig(endpoint=grpc_url)),
            ("export_grpc_none_cpu", OtlpConfig(endpoint=grpc_url, compression="none")),
            ("export_http_gzip1_cpu", OtlpConfig(endpoint=http_url, protocol="http/protobuf")),
        ):
            exporter = OtlpExporter(cfg, max_queue_bytes=1 << 30)
            e0 = time.process_time()
            exporter.submit(items)
            exporter.submit(logs)
            if not exporter.flush(300):
                raise SystemExit("the loopback sink did not take every request")
            out[key] = time.process_time() - e0
            exporter.close()
            if exporter.stats.sent_items != sum(i.count for i in items + logs):
                raise SystemExit(f"exporter lost items: {exporter.stats}")
    bodies = [i.body for i in items + logs]
    c = time.process_time()
    gz6 = [len(gzip.compress(i.body, 6)) for i in items + logs]
    out["gzip6_cpu"] = time.process_time() - c
    c = time.process_time()
    gz1 = [len(gzip.compress(b, 1)) for b in bodies]
    out["gzip1_cpu"] = time.process_time() - c
    nm = len(items)
    out.update(
        cpu=out["warm_cpu"],
        points=sum(i.count for i in items),
        records=sum(i.count for i in logs),
        metric_bytes=sum(len(b) for b in bodies[:nm]),
        log_bytes=sum(len(b) for b in bodies[nm:]),
        metric_gzip=sum(gz6[:nm]),
        log_gzip=sum(gz6[nm:]),
        gzip1_bytes=sum(gz1),
        requests=len(bodies),
        max_request=max(map(len, bodies)),
    )
    return out


def run_sdk(flows: list[DecoratedFlow]) -> dict[str, float]:
    from opentelemetry._logs import LogRecord
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    from otelflow.aggregate import Aggregator
    from otelflow.otlp.logs import record_attributes

    res = Resource.create(dict(RESOURCE))
    reader = InMemoryMetricReader()
    mp = MeterProvider(resource=res, metric_readers=[reader])
    meter = mp.get_meter("otelflow", "bench")
    cb = meter.create_counter("otelflow.flow.bytes", unit="By")
    cp = meter.create_counter("otelflow.flow.packets", unit="{packet}")
    co = meter.create_counter("otelflow.connections.opened", unit="{connection}")
    lexp = InMemoryLogExporter()
    lp = LoggerProvider(resource=res)
    lp.add_log_record_processor(SimpleLogRecordProcessor(lexp))
    logger = lp.get_logger("otelflow", "bench")
    # the same attribute sets otelflow exports (computed outside the timed region: the SDK gets them free)
    agg = Aggregator(level="workload")
    prepared = []
    for d in flows:
        f = d.flow
        fv = (f.transport, f.family, f.server_port, d.service.name if d.service else "")
        (c_src, c_dst), (s_src, s_dst), fid = (
            agg._end(d.client, f.client_ip),
            agg._end(d.server, f.server_ip),
            agg._flow(fv),
        )
        parts = agg._parts
        up = dict(parts[c_src][0] + parts[s_dst][0] + parts[fid][0])
        down = dict(parts[s_src][0] + parts[c_dst][0] + parts[fid][0])
        prepared.append((f, up, down, dict(record_attributes(d))))
    cold = 0.0
    for interval in range(2):  # as for otelflow: a cold interval, then the steady state
        lexp.clear()
        c0 = time.process_time()
        for f, up, down, la in prepared:
            cb.add(f.bytes_c2s, up)
            cp.add(f.packets_c2s, up)
            cb.add(f.bytes_s2c, down)
            cp.add(f.packets_s2c, down)
            if f.opened:
                co.add(1, up)
            logger.emit(
                LogRecord(timestamp=time.time_ns(), body=None, attributes=la, event_name="otelflow.flow")
            )
        data = reader.get_metrics_data()
        mreq = encode_metrics(data).SerializeToString()
        lreq = encode_logs(lexp.get_finished_logs()).SerializeToString()
        cpu = time.process_time() - c0
        if interval == 0:
            cold = cpu
    points = sum(
        len(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    )
    return {
        "cpu": cpu,
        "cold_cpu": cold,
        "points": points,
        "records": len(lexp.get_finished_logs()),
        "metric_bytes": len(mreq),
        "log_bytes": len(lreq),
        "metric_gzip": len(zlib.compress(mreq, 6)),
        "log_gzip": len(zlib.compress(lreq, 6)),
        "requests": 2,
    }


def child(path: str, n: int, shape: str, sink: str, source: str = "conntrack") -> None:
    flows = make_flows(n, shape=shape, source=source)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = run_otelflow(flows, sink) if path == "otelflow" else run_sdk(flows)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["rss_before_mib"] = rss0 / 1024
    print(json.dumps(res))


SINK = """
import sys, threading, time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import grpc
class Http(BaseHTTPRequestHandler):  # answers every OTLP/HTTP POST with 200 and an empty body
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
h = ThreadingHTTPServer(("127.0.0.1", 0), Http)
threading.Thread(target=h.serve_forever, daemon=True).start()
class Sink(grpc.GenericRpcHandler):  # answers every Export with an empty (full success) response
    def service(self, details):
        return grpc.unary_unary_rpc_method_handler(
            lambda req, ctx: b"", request_deserializer=None, response_serializer=None)
s = grpc.server(futures.ThreadPoolExecutor(2), handlers=[Sink()],
                options=[("grpc.max_receive_message_length", 64 << 20)])
print(s.add_insecure_port("127.0.0.1:0"), h.server_address[1], flush=True)
s.start()
sys.stdin.read()  # until the benchmark closes our stdin
"""


def median(rs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=["otelflow", "sdk"])
    ap.add_argument("--sink", default="", help="(child) gRPC and HTTP sink URLs; empty: no export")
    ap.add_argument("--shape", choices=["realistic", "unique"], default="realistic")
    ap.add_argument("--source", choices=["conntrack", "ebpf"], default="conntrack")
    ap.add_argument("--no-sdk", action="store_true", help="only the otelflow path (no ratio)")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.flows, a.shape, a.sink, a.source)
        return
    sink = subprocess.Popen(
        [sys.executable, "-c", SINK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None
        grpc_port, http_port = sink.stdout.readline().split()
        url = f"http://127.0.0.1:{int(grpc_port)},http://127.0.0.1:{int(http_port)}"
        results = run_rounds(a, url)
    finally:
        sink.communicate(timeout=10)  # closes its stdin: it exits
    report(a, results)


def run_rounds(a: argparse.Namespace, url: str) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {"otelflow": [], "sdk": []}
    paths = ("otelflow",) if a.no_sdk else ("otelflow", "sdk")
    for rnd in range(a.rounds):
        for path in paths:  # A B A B ...: machine drift hits both
            cmd = [sys.executable, __file__, "--child", path, "--flows", str(a.flows), "--shape", a.shape,
                   "--source", a.source]  # fmt: skip
            out = subprocess.run(
                [*cmd, "--sink", url if path == "otelflow" else ""],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[path].append(r)
            line = (
                f"round {rnd + 1} {path:8s}: cpu {r['cpu']:.2f}s (cold {r['cold_cpu']:.2f}s)  "
                f"points {r['points']:.0f} ({r['points'] / r['cpu']:,.0f}/s)  "
                f"records {r['records']:.0f} ({r['records'] / r['cpu']:,.0f}/s)  "
                f"metrics {r['metric_bytes'] / 1e6:.1f} MB ({r['metric_gzip'] / 1e6:.2f} gz)  "
                f"logs {r['log_bytes'] / 1e6:.1f} MB ({r['log_gzip'] / 1e6:.2f} gz)  "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB"
            )
            if path == "otelflow":
                add, menc, lenc = r["warm_parts"]  # type: ignore[misc]
                line += (
                    f"\n    warm: aggregate {add:.2f}s, metrics encode {menc:.2f}s, logs encode + "
                    f"end_interval {lenc:.2f}s; export (gRPC+gzip) {r['warm_export_cpu']:.2f}s, "
                    f"(gRPC, none) {r['export_grpc_none_cpu']:.2f}s, (HTTP, gzip -1) "
                    f"{r['export_http_gzip1_cpu']:.2f}s; "
                    f"zlib alone: gzip -6 {r['gzip6_cpu']:.2f}s, gzip -1 {r['gzip1_cpu']:.2f}s "
                    f"({r['gzip1_bytes'] / 1e6:.2f} MB)"
                )
            print(line, flush=True)
    return results


def report(a: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> None:
    o = results["otelflow"]
    enc, exp = median(o, "cpu"), median(o, "warm_export_cpu")
    print(
        f"RESULT shape={a.shape} source={a.source} flows={a.flows} rounds={a.rounds} (medians)\n"
        f"  otelflow encode (aggregate + metrics + one log record per flow), warm: {enc:.2f} s CPU "
        f"(least disturbed round {min(r['cpu'] for r in o):.2f} s; cold {median(o, 'cold_cpu'):.2f} s); "
        f"target <= 1 s: {'met' if enc <= 1.0 else 'NOT met'} by the median\n"
        f"  + export as configured by default (gRPC, gzip level 6 in grpc core): {exp:.2f} s -> "
        f"{enc + exp:.2f} s per interval; zlib alone on these bytes: gzip -6 {median(o, 'gzip6_cpu'):.2f} s, "
        f"gzip -1 {median(o, 'gzip1_cpu'):.2f} s; export with gRPC, none: {median(o, 'export_grpc_none_cpu'):.2f} s, "
        f"with HTTP, gzip -1: {median(o, 'export_http_gzip1_cpu'):.2f} s\n"
        f"  points/s {median(o, 'points') / enc:,.0f}  records/s {median(o, 'records') / enc:,.0f}  "
        f"wire: metrics {median(o, 'metric_bytes') / 1e6:.1f} MB (gzip -6 {median(o, 'metric_gzip') / 1e6:.2f} MB), "
        f"logs {median(o, 'log_bytes') / 1e6:.1f} MB (gzip -6 {median(o, 'log_gzip') / 1e6:.2f} MB), "
        f"all at gzip -1 {median(o, 'gzip1_bytes') / 1e6:.2f} MB; {median(o, 'requests'):.0f} requests, "
        f"largest {median(o, 'max_request') / 1e6:.2f} MB\n"
        f"  otelflow peak RSS {median(o, 'peak_rss_mib'):.0f} MiB"
    )
    s = results["sdk"]
    if s:
        ratios = [y["cpu"] / x["cpu"] for x, y in zip(o, s, strict=True)]
        cold = [y["cold_cpu"] / x["cold_cpu"] for x, y in zip(o, s, strict=True)]
        print(
            f"  SDK encode, warm: {median(s, 'cpu'):.2f} s CPU (cold {median(s, 'cold_cpu'):.2f} s), "
            f"peak RSS {median(s, 'peak_rss_mib'):.0f} MiB, {median(s, 'metric_bytes') / 1e6:.1f} MB "
            f"metrics + {median(s, 'log_bytes') / 1e6:.1f} MB logs\n"
            f"  ratio SDK/otelflow encode CPU: warm {statistics.median(ratios):.1f}x "
            f"(rounds: {', '.join(f'{x:.1f}' for x in ratios)}), cold {statistics.median(cold):.1f}x"
        )


if __name__ == "__main__":
    main()
