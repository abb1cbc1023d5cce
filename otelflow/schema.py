"""Every metric and attribute otelflow exports, defined once. docs/telemetry.md is generated from
this module (`python -m otelflow.schema > docs/telemetry.md`) and a test fails when they drift.

Naming. OpenTelemetry semantic-convention names are used wherever one exists (`k8s.*`,
`cloud.availability_zone`, `network.transport`, `network.type`, `server.port`). No convention names
"the other end" of a flow, so each end's attributes are the semconv names prefixed with `source.` or
`destination.`: the direction **the bytes travel** (source sent them). These prefixes are the
`source.*`/`destination.*` families of the semconv network registry (development status), applied to
whole attribute groups. Attributes that have no convention live under `otelflow.`, except the
uniform workload pair `k8s.workload.name`/`k8s.workload.kind`, otelflow's own (no semconv yet), kept
next to the per-kind `k8s.deployment.name`, `k8s.statefulset.name`, ... that it summarises.

Metric names live in the `otelflow.` namespace with UCUM units, so the collector's Prometheus
exporter produces the names in the `prometheus` column (counter `otelflow.flow.bytes` with unit `By`
-> `otelflow_flow_bytes_total`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

Level = Literal["workload", "pod", "flow"]
LEVELS: tuple[Level, ...] = ("workload", "pod", "flow")
MetricKind = Literal["counter", "updowncounter", "histogram", "gauge"]


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str
    type: str  # "string" | "int"
    brief: str
    source: str  # where the value comes from
    level: Level = "workload"  # the coarsest aggregation level that carries it
    semconv: bool = True


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    kind: MetricKind
    brief: str
    prometheus: str
    attributes: str  # which attribute set: "flow" or "self"
    source: str = "all"  # "all" sources, or "ebpf" only
    bounds: tuple[float, ...] = ()  # a histogram's explicit bucket bounds (upper bounds, inclusive)


# ---- the attributes of one end (prefixed with source. / destination.) --------------------------------
END_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "k8s.namespace.name", "string", "namespace of the pod (or of the inventory host)", "pod metadata"
    ),
    Attribute(
        "k8s.workload.name",
        "string",
        "name of the top owner: Deployment, StatefulSet, DaemonSet, CronJob, Job, or the pod itself",
        "owner references (ReplicaSet -> Deployment, Job -> CronJob)",
        semconv=False,
    ),
    Attribute(
        "k8s.workload.kind",
        "string",
        "kind of that owner (Deployment, StatefulSet, ...)",
        "owner references",
        semconv=False,
    ),
    Attribute(
        "k8s.deployment.name", "string", "the Deployment, when the workload is one", "owner references"
    ),
    Attribute(
        "k8s.statefulset.name", "string", "the StatefulSet, when the workload is one", "owner references"
    ),
    Attribute("k8s.daemonset.name", "string", "the DaemonSet, when the workload is one", "owner references"),
    Attribute("k8s.job.name", "string", "the Job, when the workload is one", "owner references"),
    Attribute("k8s.cronjob.name", "string", "the CronJob, when the workload is one", "owner references"),
    Attribute(
        "cloud.availability_zone",
        "string",
        "zone of the node the end runs on",
        "node label topology.kubernetes.io/zone",
    ),
    Attribute(
        "cloud.region",
        "string",
        "region of the node the end runs on",
        "node label topology.kubernetes.io/region",
    ),
    Attribute(
        "otelflow.peer.class",
        "string",
        "pod, node, service, host (inventory), or for addresses nobody owns: a named CIDR group, loopback, "
        "multicast, link-local, private or public (a raw public address is never exported in metrics)",
        "IP index and classification",
        semconv=False,
    ),
    Attribute("k8s.pod.name", "string", "the pod", "pod metadata", level="pod"),
    Attribute(
        "k8s.node.name",
        "string",
        "the node the end runs on (a host-network end is its node)",
        "pod spec.nodeName",
        level="pod",
    ),
    Attribute("k8s.pod.uid", "string", "the pod's UID", "pod metadata", level="flow"),
    Attribute(
        "address",
        "string",
        "the end's IP address, for in-cluster ends only",
        "the flow's tuple",
        level="flow",
    ),
)

# ---- attributes of the flow as a whole ---------------------------------------------------------------
FLOW_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("network.transport", "string", "tcp, udp, icmp, ...", "the flow's tuple"),
    Attribute("network.type", "string", "ipv4 or ipv6", "the flow's tuple"),
    Attribute(
        "server.port",
        "int",
        "the server's port (the port the client dialed; never an ephemeral port)",
        "the flow's tuple",
    ),
    Attribute(
        "k8s.service.name",
        "string",
        "the Service the client addressed (ClusterIP), or whose endpoints hold the answering pod on "
        "that port",
        "conntrack NAT + Service/EndpointSlice metadata",
    ),
)

# ---- resource attributes of the agent ----------------------------------------------------------------
RESOURCE_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("service.name", "string", "otelflow (export.service_name / OTEL_SERVICE_NAME)", "config"),
    Attribute("service.version", "string", "the agent's version", "package"),
    Attribute("service.instance.id", "string", "unique per agent process", "generated at start"),
    Attribute(
        "k8s.node.name", "string", "the node this agent runs on", "NODE_NAME (downward API) / node_name"
    ),
    Attribute("k8s.cluster.name", "string", "the cluster (cluster_name)", "config"),
    Attribute("host.name", "string", "the host name", "the kernel"),
)

# Bucket bounds of otelflow.tcp.rtt, in seconds: 1-2.5-5 steps per decade (each bucket 2-2.5x the
# one below, so a quantile read from them is within a factor ~2 of the truth) from 50 us to 5 s: pod to
# pod on one node is tens of us (<= 50 us), across nodes in a zone 100-500 us, across zones 0.5-2.5 ms,
# across regions and to the internet 10-250 ms; 0.5-5 s are queues gone wrong (bufferbloat, a
# retransmission storm); beyond that +Inf. 16 bounds: 17 buckets (327 bytes per OTLP data point
# besides its attributes).
RTT_BOUNDS_S: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

# ---- flow-log records (one OTLP log record per flow per interval and at close) ----------------------
# A record describes a connection: its ends are client.* and server.* (LOG_END_ATTRIBUTES under those
# prefixes), and it carries the flow's own attributes (LOG_ATTRIBUTES). Flags are ints (0/1); an
# attribute without a value (no Service, no NAT, no counters, no TCP health hook) is absent.
LOG_END_ATTRIBUTES: tuple[Attribute, ...] = (
    *(
        a
        for a in END_ATTRIBUTES
        if a.name
        in (
            "k8s.namespace.name",
            "k8s.pod.name",
            "k8s.pod.uid",
            "k8s.workload.name",
            "k8s.workload.kind",
            "k8s.node.name",
            "cloud.availability_zone",
            "cloud.region",
            "otelflow.peer.class",
        )
    ),
    Attribute(
        "otelflow.peer.name",
        "string",
        "the node's or inventory host's name",
        "node / inventory",
        semconv=False,
    ),
)

_DIR = {"c2s": "client to server", "s2c": "server to client"}
LOG_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "client.address",
        "string",
        "the client's address (the side that opened the connection)",
        "the flow's tuple",
    ),
    Attribute("client.port", "int", "the client's port", "the flow's tuple"),
    Attribute(
        "server.address",
        "string",
        "the address that answered (the backend behind a DNAT)",
        "the flow's tuple",
    ),
    Attribute("server.port", "int", "the port that answered", "the flow's tuple"),
    Attribute("network.transport", "string", "tcp, udp, icmp, ...", "the flow's tuple"),
    Attribute("network.type", "string", "ipv4 or ipv6", "the flow's tuple"),
    Attribute(
        "otelflow.flow.id",
        "string",
        "observer/id: unique per flow, the same on all of its records",
        "the agent",
        semconv=False,
    ),
    Attribute("otelflow.flow.source", "string", "conntrack or ebpf", "the agent", semconv=False),
    Attribute("otelflow.observer", "string", "the node that wrote the record", "the agent", semconv=False),
    Attribute(
        "k8s.service.name",
        "string",
        "the Service the client addressed, or whose endpoints answered",
        "conntrack NAT + Service metadata",
    ),
    Attribute(
        "otelflow.service.namespace", "string", "that Service's namespace", "Service metadata", semconv=False
    ),
    Attribute(
        "otelflow.nat.dialed.address",
        "string",
        "the address the client dialed (a ClusterIP), when a DNAT changed it",
        "conntrack",
        semconv=False,
    ),
    Attribute(
        "otelflow.nat.dialed.port", "int", "the port the client dialed, likewise", "conntrack", semconv=False
    ),
    Attribute(
        "otelflow.nat.client.address",
        "string",
        "the client as the server saw it, after SNAT (masquerade)",
        "conntrack",
        semconv=False,
    ),
    Attribute("otelflow.nat.client.port", "int", "the client's port after SNAT", "conntrack", semconv=False),
    Attribute(
        "otelflow.flow.opened",
        "int",
        "1 when the connection opened during this record's interval",
        "the flow source",
        semconv=False,
    ),
    Attribute(
        "otelflow.flow.closed",
        "int",
        "1 on the connection's closing record",
        "the flow source",
        semconv=False,
    ),
    Attribute(
        "otelflow.flow.duration_ms",
        "int",
        "milliseconds from the first observation to this record's",
        "the flow source",
        semconv=False,
    ),
    Attribute(
        "otelflow.flow.state",
        "string",
        "TCP state as conntrack names it (ESTABLISHED, TIME_WAIT, ...)",
        "the flow source",
        semconv=False,
    ),
    *(
        Attribute(
            f"otelflow.flow.{what}.{d}",
            "int",
            f"{what} sent {_DIR[d]} during the interval (L3)",
            "the flow source",
            semconv=False,
        )
        for what in ("bytes", "packets")
        for d in ("c2s", "s2c")
    ),
    *(
        Attribute(
            f"otelflow.tcp.{what}.{d}",
            "int",
            f"TCP {brief} sent {_DIR[d]} during the interval (0: the hook ran, nothing happened); "
            "TCP flows of the eBPF source",
            "TCP tracepoints (eBPF)",
            semconv=False,
        )
        for what, brief in (("retransmits", "segments retransmitted"), ("resets", "resets (RST)"))
        for d in ("c2s", "s2c")
    ),
    *(
        Attribute(
            f"otelflow.tcp.rtt.{d}",
            "double",
            f"smoothed round-trip time in seconds measured by the {'client' if d == 'c2s' else 'server'}'s "
            "socket (its latest sample in the interval; absent without a sample)",
            "TCP tracepoints (eBPF)",
            semconv=False,
        )
        for d in ("c2s", "s2c")
    ),
)

METRICS: tuple[Metric, ...] = (
    Metric(
        "otelflow.flow.bytes",
        "By",
        "counter",
        "L3 bytes sent from source to destination, counted once cluster-wide",
        "otelflow_flow_bytes_total",
        "flow",
    ),
    Metric(
        "otelflow.flow.packets",
        "{packet}",
        "counter",
        "IP packets sent from source to destination, counted once",
        "otelflow_flow_packets_total",
        "flow",
    ),
    Metric(
        "otelflow.flow.interzone.bytes",
        "By",
        "counter",
        "the part of otelflow.flow.bytes whose source and destination run in different zones (both known)",
        "otelflow_flow_interzone_bytes_total",
        "flow",
    ),
    Metric(
        "otelflow.connections.opened",
        "{connection}",
        "counter",
        "connections opened; source = client, destination = server",
        "otelflow_connections_opened_total",
        "flow",
    ),
    Metric(
        "otelflow.connections.closed",
        "{connection}",
        "counter",
        "connections closed; source = client, destination = server",
        "otelflow_connections_closed_total",
        "flow",
    ),
    Metric(
        "otelflow.connections.active",
        "{connection}",
        "updowncounter",
        "connections open now (opened - closed); source = client",
        "otelflow_connections_active",
        "flow",
    ),
    Metric(
        "otelflow.tcp.retransmits",
        "{segment}",
        "counter",
        "TCP segments retransmitted by source",
        "otelflow_tcp_retransmits_total",
        "flow",
        "ebpf",
    ),
    Metric(
        "otelflow.tcp.resets",
        "{reset}",
        "counter",
        "TCP resets sent by source",
        "otelflow_tcp_resets_total",
        "flow",
        "ebpf",
    ),
    Metric(
        "otelflow.tcp.rtt",
        "s",
        "histogram",
        "smoothed TCP round-trip time measured by source's socket: one observation per flow direction "
        "per poll that had a sample (that socket's latest srtt)",
        "otelflow_tcp_rtt_seconds",
        "flow",
        "ebpf",
        RTT_BOUNDS_S,
    ),
)


@dataclass(frozen=True, slots=True)
class SelfMetric:
    name: str  # Prometheus name on the agent's /metrics
    kind: Literal["counter", "gauge"]
    brief: str
    labels: tuple[str, ...] = ()


# label values of otelflow_agent_ebpf_health_lost_events_total: TCP health features x loss reasons
HEALTH_FEATURES = ("retransmits", "rtt", "resets", "state")
HEALTH_LOSS_REASONS = ("map_full", "kernel_skipped", "unjoined")

# The agent's own health, on its /metrics (low cardinality: at most a reason or a resource label).
SELF_METRICS: tuple[SelfMetric, ...] = (
    SelfMetric(
        "otelflow_agent_up",
        "gauge",
        "1 while the agent runs; label source: the flow source in use",
        ("source",),
    ),
    SelfMetric("otelflow_agent_flow_records_total", "counter", "flow deltas processed"),
    SelfMetric("otelflow_agent_flows_tracked", "gauge", "flows the source tracks now"),
    SelfMetric(
        "otelflow_agent_flows_vanished_total",
        "counter",
        "flows that left conntrack without a DESTROY event (final bytes unknown)",
    ),
    SelfMetric(
        "otelflow_agent_conntrack_event_overflows_total",
        "counter",
        "conntrack event socket overflows (ENOBUFS), each followed by a resync dump",
    ),
    SelfMetric("otelflow_agent_parse_malformed_total", "counter", "malformed netlink messages skipped"),
    SelfMetric("otelflow_agent_conntrack_table_entries", "gauge", "entries in the node's conntrack table"),
    SelfMetric(
        "otelflow_agent_conntrack_table_max", "gauge", "the conntrack table's capacity (nf_conntrack_max)"
    ),
    SelfMetric("otelflow_agent_metric_series", "gauge", "live metric series across flow metrics"),
    SelfMetric(
        "otelflow_agent_metric_overflow_points_total",
        "counter",
        "points folded into the overflow series (cardinality cap)",
    ),
    SelfMetric("otelflow_agent_export_requests_total", "counter", "OTLP requests attempted"),
    SelfMetric(
        "otelflow_agent_export_failed_requests_total",
        "counter",
        "OTLP requests that failed (each retry counts)",
    ),
    SelfMetric("otelflow_agent_export_retries_total", "counter", "OTLP retries"),
    SelfMetric(
        "otelflow_agent_export_dropped_items_total",
        "counter",
        "points and log records given up, by reason",
        ("reason",),
    ),
    SelfMetric(
        "otelflow_agent_export_superseded_points_total",
        "counter",
        "queued cumulative points replaced by a newer snapshot (no data lost)",
    ),
    SelfMetric(
        "otelflow_agent_export_rejected_items_total",
        "counter",
        "items the collector rejected (partial success)",
    ),
    SelfMetric("otelflow_agent_export_queue_bytes", "gauge", "bytes waiting in the OTLP queue"),
    SelfMetric(
        "otelflow_agent_flow_logs_filtered_total",
        "counter",
        "flow-log records dropped by the filters or sampling",
    ),
    SelfMetric(
        "otelflow_agent_top_evicted_total",
        "counter",
        "open connections dropped from the live view (api.top_max_connections reached)",
    ),
    SelfMetric(
        "otelflow_agent_metadata_staleness_seconds",
        "gauge",
        "time since the Kubernetes API was last heard from (0 without Kubernetes)",
    ),
    SelfMetric("otelflow_agent_index_addresses", "gauge", "addresses in the IP index"),
    SelfMetric(
        "otelflow_agent_source",
        "gauge",
        "1, labelled with the flow source in use, the one requested (auto, ebpf, conntrack) and why "
        "(requested, ebpf_ready, no_btf, bpf_denied, tc_attach_failed, tcx_attach_failed, ebpf_unavailable)",
        ("source", "requested", "reason"),
    ),
    SelfMetric(
        "otelflow_agent_ebpf_attach",
        "gauge",
        "1, labelled with the TC attach backend the eBPF source uses (tcx, tc; none without the eBPF source)",
        ("mode",),
    ),
    SelfMetric("otelflow_agent_ebpf_interfaces", "gauge", "interfaces the TC programs are attached to"),
    SelfMetric(
        "otelflow_agent_ebpf_attach_errors_total",
        "counter",
        "attaches that failed (that interface's traffic is counted only where it is seen elsewhere)",
    ),
    SelfMetric("otelflow_agent_ebpf_map_entries", "gauge", "flows the last drain read from the flow map"),
    SelfMetric("otelflow_agent_ebpf_map_capacity", "gauge", "flows the flow map holds per interval"),
    SelfMetric(
        "otelflow_agent_ebpf_dropped_packets_total",
        "counter",
        "packets the TC programs could not count, by reason (map_full, other)",
        ("reason",),
    ),
    SelfMetric(
        "otelflow_agent_ebpf_dropped_bytes_total",
        "counter",
        "bytes of those packets, by reason (map_full, other)",
        ("reason",),
    ),
    SelfMetric(
        "otelflow_agent_ebpf_unmatched_counts_total",
        "counter",
        "one-way counts conntrack did not name (paired by mirroring: no NAT view)",
    ),
    SelfMetric(
        "otelflow_agent_ebpf_health_lost_events_total",
        "counter",
        "TCP health events lost, by reason (map_full: the socket map was full; kernel_skipped: the "
        "kernel did not run the program, recursion on that CPU, counted machine-wide; unjoined: the "
        "socket's flow was gone before a flow delta could carry them) and feature (retransmits, rtt, "
        "resets, state)",
        ("reason", "feature"),
    ),
)


def end_attributes(level: Level) -> tuple[Attribute, ...]:
    rank = LEVELS.index(level)
    return tuple(a for a in END_ATTRIBUTES if LEVELS.index(a.level) <= rank)


def metric_attribute_names(level: Level) -> tuple[str, ...]:
    """Attribute keys of flow metrics at one aggregation level, in export order."""
    ends = end_attributes(level)
    return (
        *(f"source.{a.name}" for a in ends),
        *(f"destination.{a.name}" for a in ends),
        *(a.name for a in FLOW_ATTRIBUTES),
    )


def markdown() -> str:
    """docs/telemetry.md."""
    out = [
        "# otelflow telemetry reference",
        "",
        "Generated from `otelflow/schema.py` by `python -m otelflow.schema`; do not edit by hand.",
        "",
        "## Metrics",
        "",
        "| name | unit | kind | Prometheus name | sources | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        out.append(f"| `{m.name}` | `{m.unit}` | {m.kind} | `{m.prometheus}` | {m.source} | {m.brief} |")
    for m in METRICS:
        if m.bounds:
            le = ", ".join(f"{b:g}" for b in m.bounds)
            out += ["", f"Bucket bounds of `{m.name}` ({m.unit}, upper bound inclusive, then +Inf): {le}."]
    out += [
        "",
        "## Flow attributes",
        "",
        "Each end of a flow carries these, prefixed with `source.` (the end that sent the bytes) or",
        "`destination.` (the end that received them). *Level* is the coarsest aggregation level",
        "(`workload` < `pod` < `flow`) that exports the attribute; finer levels include coarser ones.",
        "",
        "| attribute | type | level | semconv | meaning | source |",
        "|---|---|---|---|---|---|",
    ]
    for a in END_ATTRIBUTES:
        sc = "yes" if a.semconv else "no"
        names = f"`source.{a.name}` / `destination.{a.name}`"
        out.append(f"| {names} | {a.type} | {a.level} | {sc} | {a.brief} | {a.source} |")
    out += [
        "",
        "Attributes of the flow as a whole:",
        "",
        "| attribute | type | level | meaning | source |",
        "|---|---|---|---|---|",
    ]
    for a in FLOW_ATTRIBUTES:
        out.append(f"| `{a.name}` | {a.type} | {a.level} | {a.brief} | {a.source} |")
    out += [
        "",
        "## The agent's own metrics (on its `/metrics`)",
        "",
        "| name | kind | labels | meaning |",
        "|---|---|---|---|",
    ]
    for sm in SELF_METRICS:
        out.append(f"| `{sm.name}` | {sm.kind} | {', '.join(sm.labels) or '-'} | {sm.brief} |")
    out += [
        "",
        "## Flow-log records",
        "",
        "One OTLP log record (event `otelflow.flow`) per flow per interval and at close. Its ends carry",
        "these names prefixed with `client.` and `server.` (only those with a value):",
        "",
        "| attribute | type | meaning |",
        "|---|---|---|",
    ]
    for a in LOG_END_ATTRIBUTES:
        out.append(f"| `client.{a.name}` / `server.{a.name}` | {a.type} | {a.brief} |")
    out += [
        "",
        "and the flow's own attributes:",
        "",
        "| attribute | type | meaning | source |",
        "|---|---|---|---|",
    ]
    for a in LOG_ATTRIBUTES:
        out.append(f"| `{a.name}` | {a.type} | {a.brief} | {a.source} |")
    out += ["", "## Resource attributes", "", "| attribute | meaning | source |", "|---|---|---|"]
    for a in RESOURCE_ATTRIBUTES:
        out.append(f"| `{a.name}` | {a.brief} | {a.source} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
