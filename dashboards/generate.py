"""Writes the Grafana dashboards dashboards/*.json: `python dashboards/generate.py` (a unit test
fails when the committed files differ from what this writes, and checks every query against
otelflow/schema.py).

The queries read what the gateway collector (collector-config/gateway.yaml) exposes to Prometheus:
otelflow's OTLP metrics under their Prometheus names (otelflow.flow.bytes -> otelflow_flow_bytes_total,
attribute dots -> underscores: source.k8s.workload.name -> source_k8s_workload_name), with the
agent's resource attributes copied onto every series (k8s_cluster_name, k8s_node_name).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

# label filters shared by every flow query: the cluster, and (where a panel says so) the namespace
CLUSTER = 'k8s_cluster_name=~"$cluster"'


def selectors(metric: str, extra: str = "") -> tuple[str, str]:
    """`metric` filtered by cluster, once with the source end in $namespace, once with the
    destination end."""
    more = f",{extra}" if extra else ""
    return (
        f'{metric}{{{CLUSTER},source_k8s_namespace_name=~"$namespace"{more}}}',
        f'{metric}{{{CLUSTER},destination_k8s_namespace_name=~"$namespace"{more}}}',
    )


def flows(metric: str, extra: str = "") -> str:
    """The series of `metric` with either end in $namespace (`or` keeps a series matching both
    selectors once)."""
    a, b = selectors(metric, extra)
    return f"({a} or {b})"


def over(fn: str, metric: str, window: str = RATE, extra: str = "") -> str:
    """fn (rate, increase) over the series with either end in $namespace."""
    a, b = selectors(metric, extra)
    return f"({fn}({a}[{window}]) or {fn}({b}[{window}]))"


def rate(metric: str, extra: str = "") -> str:
    return over("rate", metric, RATE, extra)


def end_label(expr: str, end: str, label: str) -> str:
    """Adds label `label` naming one end of each series: "namespace/workload" when the end has a
    workload, else its peer class in brackets ("[public]", "[node]", ...). A temporary label
    `<label>_workload` holds the joined pair; `sum by` drops it afterwards."""
    tmp = f"{label}_workload"
    step = f'label_replace({expr}, "{label}", "[$1]", "{end}_otelflow_peer_class", "(.*)")'
    step = f'label_join({step}, "{tmp}", "/", "{end}_k8s_namespace_name", "{end}_k8s_workload_name")'
    return f'label_replace({step}, "{label}", "$1", "{tmp}", "(.+/.+)")'


WORKLOAD_PAIR = (
    "source_k8s_namespace_name, source_k8s_workload_name, "
    "destination_k8s_namespace_name, destination_k8s_workload_name"
)
PAIR_LEGEND = (
    "{{source_k8s_namespace_name}}/{{source_k8s_workload_name}} → "
    "{{destination_k8s_namespace_name}}/{{destination_k8s_workload_name}}"
)


@dataclass
class Target:
    expr: str
    legend: str = ""
    ref: str = "A"
    instant: bool = False
    fmt: str = "time_series"  # time_series | table | heatmap

    def json(self) -> dict[str, Any]:
        return {
            "datasource": DS,
            "refId": self.ref,
            "expr": self.expr,
            "legendFormat": self.legend,
            "instant": self.instant,
            "range": not self.instant,
            "format": self.fmt,
        }


@dataclass
class Panel:
    type: str
    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    w: int = 12
    h: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    transformations: list[dict[str, Any]] = field(default_factory=list)
    custom: dict[str, Any] = field(default_factory=dict)


def variables(namespace: bool, topn: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
        {
            "name": "cluster",
            "label": "Cluster",
            "type": "query",
            "datasource": DS,
            "query": {"query": "label_values(otelflow_agent_up, k8s_cluster_name)", "refId": "cluster"},
            "definition": "label_values(otelflow_agent_up, k8s_cluster_name)",
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "hide": 0,
        },
    ]
    if namespace:
        q = "label_values(otelflow_flow_bytes_total{" + CLUSTER + "}, destination_k8s_namespace_name)"
        out.append(
            {
                "name": "namespace",
                "label": "Namespace (either end)",
                "type": "query",
                "datasource": DS,
                "query": {"query": q, "refId": "namespace"},
                "definition": q,
                "refresh": 2,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "hide": 0,
            }
        )
    if topn:
        out.append(
            {
                "name": "topn",
                "label": "Top",
                "type": "custom",
                "query": "10,20,50",
                "options": [{"selected": v == "10", "text": v, "value": v} for v in ("10", "20", "50")],
                "current": {"selected": True, "text": "10", "value": "10"},
                "hide": 0,
            }
        )
    return out


def panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.custom:
        defaults["custom"] = p.custom
    out: dict[str, Any] = {
        "id": pid,
        "type": p.type,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.h, "w": p.w, "x": x, "y": y},
        "targets": [t.json() for t in p.targets],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": p.options,
    }
    if p.transformations:
        out["transformations"] = p.transformations
    return out


def dashboard(
    uid: str, title: str, description: str, panels: list[Panel], namespace: bool, topn: bool
) -> dict[str, Any]:
    laid: list[dict[str, Any]] = []
    x = y = row_h = 0
    for i, p in enumerate(panels, start=1):
        if x + p.w > 24:
            x, y, row_h = 0, y + row_h, 0
        laid.append(panel_json(p, i, x, y))
        x += p.w
        row_h = max(row_h, p.h)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["otelflow"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "title": "otelflow",
                "tags": ["otelflow"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": variables(namespace, topn)},
        "panels": laid,
    }


def timeseries(title: str, description: str, targets: list[Target], unit: str, w: int = 12) -> Panel:
    return Panel(
        "timeseries",
        title,
        description,
        targets,
        unit=unit,
        w=w,
        options={"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]}},
    )


def table(title: str, description: str, target: Target, unit: str, w: int = 12) -> Panel:
    target.instant, target.fmt = True, "table"
    return Panel(
        "table",
        title,
        description,
        [target],
        unit=unit,
        w=w,
        options={"sortBy": [{"displayName": "Value", "desc": True}]},
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}],
    )


def stat(title: str, description: str, target: Target, unit: str, w: int = 6) -> Panel:
    target.instant = True
    return Panel("stat", title, description, [target], unit=unit, w=w, h=5, options={"colorMode": "value"})


# ---- service map ------------------------------------------------------------------------------------


def service_map() -> dict[str, Any]:
    bytes_rate = rate("otelflow_flow_bytes_total")
    edges = (
        "sum by (id, source, target) ("
        + "label_join("
        + end_label(end_label(bytes_rate, "source", "source"), "destination", "target")
        + ', "id", " -> ", "source", "target"))'
    )
    sent = f"sum by (id) ({end_label(bytes_rate, 'source', 'id')})"
    received = f"sum by (id) ({end_label(bytes_rate, 'destination', 'id')})"
    nodes = (
        f'sum by (id) (label_replace({sent}, "dir", "out", "", "")'
        f' or label_replace({received}, "dir", "in", "", ""))'
    )
    graph = Panel(
        "nodeGraph",
        "Service map: workloads, bytes/s",
        "Nodes are workloads (namespace/workload), or a peer class in brackets for ends nobody owns "
        "([public], [node], ...); node stat: bytes/s sent + received. Edges point the way the bytes "
        "travel, so a conversation is two edges (requests one way, answers the other); edge stat: "
        "bytes/s. How it is built: Grafana's node graph reads a frame named 'nodes' (fields id, "
        "mainstat) and a frame named 'edges' (id, source, target, mainstat). The two instant queries "
        "have those refIds and table format, so each label becomes a field; label_replace/label_join "
        "build the id, source and target labels (namespace/workload, else [peer class]); the "
        "transformations drop Time and rename the value field to mainstat.",
        [
            Target(nodes, ref="nodes", instant=True, fmt="table"),
            Target(edges, ref="edges", instant=True, fmt="table"),
        ],
        unit="Bps",
        w=24,
        h=18,
        options={"nodes": {"mainStatUnit": "Bps"}, "edges": {"mainStatUnit": "Bps"}},
        transformations=[
            {"id": "organize", "options": {"excludeByName": {"Time": True}}},
            {"id": "renameByRegex", "options": {"regex": "^Value.*$", "renamePattern": "mainstat"}},
        ],
    )
    pairs = table(
        "Edges: bytes/s per workload pair",
        "The service map's edges as a table: bytes/s from source to destination workload.",
        Target(f"sum by ({WORKLOAD_PAIR}) ({bytes_rate})"),
        "Bps",
        w=24,
    )
    pairs.h = 10
    return dashboard(
        "otelflow-service-map",
        "otelflow / Service map",
        "Who talks to whom: workloads as nodes, bytes/s as edges.",
        [graph, pairs],
        namespace=True,
        topn=False,
    )


# ---- top talkers ------------------------------------------------------------------------------------


def top_talkers() -> dict[str, Any]:
    b = rate("otelflow_flow_bytes_total")
    outside = 'destination_otelflow_peer_class!~"pod|node|service|host|loopback"'
    inside = 'source_otelflow_peer_class!~"pod|node|service|host|loopback"'
    panels = [
        timeseries(
            "Top workload pairs, bytes/s",
            "The $topn source → destination workload pairs moving the most bytes.",
            [Target(f"topk($topn, sum by ({WORKLOAD_PAIR}) ({b}))", PAIR_LEGEND)],
            "Bps",
            w=24,
        ),
        timeseries(
            "Top senders, bytes/s",
            "Workloads (or peer classes) sending the most bytes, to anyone.",
            [
                Target(
                    "topk($topn, sum by (source_k8s_namespace_name, source_k8s_workload_name, "
                    f"source_otelflow_peer_class) ({b}))",
                    "{{source_k8s_namespace_name}}/{{source_k8s_workload_name}} "
                    "{{source_otelflow_peer_class}}",
                )
            ],
            "Bps",
        ),
        timeseries(
            "Top receivers, bytes/s",
            "Workloads (or peer classes) receiving the most bytes, from anyone.",
            [
                Target(
                    "topk($topn, sum by (destination_k8s_namespace_name, destination_k8s_workload_name, "
                    f"destination_otelflow_peer_class) ({b}))",
                    "{{destination_k8s_namespace_name}}/{{destination_k8s_workload_name}} "
                    "{{destination_otelflow_peer_class}}",
                )
            ],
            "Bps",
        ),
        timeseries(
            "Egress: bytes/s leaving the cluster",
            "Bytes whose destination nobody in the cluster owns (public, private, named CIDR groups...), "
            "by sending workload and destination class.",
            [
                Target(
                    "topk($topn, sum by (source_k8s_namespace_name, source_k8s_workload_name, "
                    f"destination_otelflow_peer_class) ({rate('otelflow_flow_bytes_total', outside)}))",
                    "{{source_k8s_namespace_name}}/{{source_k8s_workload_name}} → "
                    "[{{destination_otelflow_peer_class}}]",
                )
            ],
            "Bps",
        ),
        timeseries(
            "Ingress: bytes/s entering the cluster",
            "Bytes whose source nobody in the cluster owns, by receiving workload and source class.",
            [
                Target(
                    "topk($topn, sum by (destination_k8s_namespace_name, destination_k8s_workload_name, "
                    f"source_otelflow_peer_class) ({rate('otelflow_flow_bytes_total', inside)}))",
                    "[{{source_otelflow_peer_class}}] → "
                    "{{destination_k8s_namespace_name}}/{{destination_k8s_workload_name}}",
                )
            ],
            "Bps",
        ),
        timeseries(
            "Top workload pairs, packets/s",
            "The $topn pairs by IP packets.",
            [
                Target(
                    f"topk($topn, sum by ({WORKLOAD_PAIR}) ({rate('otelflow_flow_packets_total')}))",
                    PAIR_LEGEND,
                )
            ],
            "pps",
        ),
        timeseries(
            "Connections opened/s by Service",
            "New connections per second to each Service (source = client).",
            [
                Target(
                    "topk($topn, sum by (destination_k8s_namespace_name, k8s_service_name) "
                    f"({rate('otelflow_connections_opened_total')}))",
                    "{{destination_k8s_namespace_name}}/{{k8s_service_name}}",
                )
            ],
            "cps",
        ),
        table(
            "Active connections by client → server workload",
            "Connections open now (source = client, destination = server).",
            Target(
                f"topk($topn, sum by ({WORKLOAD_PAIR}) ({flows('otelflow_connections_active')}))",
            ),
            "short",
            w=24,
        ),
        table(
            "Bytes over the time range by workload pair and server port",
            "Total bytes moved during the dashboard's time range.",
            Target(
                f"topk($topn, sum by ({WORKLOAD_PAIR}, server_port, network_transport) "
                f"({over('increase', 'otelflow_flow_bytes_total', '$__range')}))",
            ),
            "decbytes",
            w=24,
        ),
    ]
    return dashboard(
        "otelflow-top-talkers",
        "otelflow / Top talkers",
        "Who moves the most bytes, packets and connections; traffic in and out of the cluster.",
        panels,
        namespace=True,
        topn=True,
    )


# ---- inter-zone -------------------------------------------------------------------------------------


def inter_zone() -> dict[str, Any]:
    iz = rate("otelflow_flow_interzone_bytes_total")
    zone_pair = "source_cloud_availability_zone, destination_cloud_availability_zone"
    panels = [
        stat(
            "Inter-zone bytes/s now",
            "Bytes per second whose two ends run in different zones (both zones known).",
            Target(f"sum({iz})"),
            "Bps",
        ),
        stat(
            "Share of bytes crossing zones",
            "Inter-zone bytes / all bytes.",
            Target(f"sum({iz}) / sum({rate('otelflow_flow_bytes_total')})"),
            "percentunit",
        ),
        stat(
            "Inter-zone bytes over the time range",
            "What cross-zone transfer is usually billed on.",
            Target(f"sum({over('increase', 'otelflow_flow_interzone_bytes_total', '$__range')})"),
            "decbytes",
        ),
        stat(
            "Zone pairs with traffic",
            "Distinct source zone → destination zone pairs with inter-zone series: the agents export a "
            "series while it moves bytes and forget it after export.metrics.idle_intervals idle exports.",
            Target(f"count(sum by ({zone_pair}) ({iz}))"),
            "short",
        ),
        timeseries(
            "Inter-zone bytes/s by zone pair",
            "Direction is the way the bytes travel.",
            [
                Target(
                    f"sum by ({zone_pair}) ({iz})",
                    "{{source_cloud_availability_zone}} → {{destination_cloud_availability_zone}}",
                )
            ],
            "Bps",
            w=24,
        ),
        timeseries(
            "Top inter-zone workload pairs, bytes/s",
            "The $topn workload pairs sending the most bytes across zones.",
            [Target(f"topk($topn, sum by ({WORKLOAD_PAIR}) ({iz}))", PAIR_LEGEND)],
            "Bps",
            w=24,
        ),
        table(
            "Inter-zone bytes over the time range by workload pair and zones",
            "Total cross-zone bytes during the dashboard's time range.",
            Target(
                f"topk($topn, sum by ({WORKLOAD_PAIR}, {zone_pair}) "
                f"({over('increase', 'otelflow_flow_interzone_bytes_total', '$__range')}))"
            ),
            "decbytes",
            w=24,
        ),
        timeseries(
            "Bytes/s by region pair",
            "All bytes (not only inter-zone) by source and destination region: pairs of different "
            "regions are inter-region traffic.",
            [
                Target(
                    "sum by (source_cloud_region, destination_cloud_region) "
                    f"({rate('otelflow_flow_bytes_total')})",
                    "{{source_cloud_region}} → {{destination_cloud_region}}",
                )
            ],
            "Bps",
            w=24,
        ),
    ]
    return dashboard(
        "otelflow-inter-zone",
        "otelflow / Inter-zone traffic",
        "Bytes that cross availability zones (the ones that cost money).",
        panels,
        namespace=True,
        topn=True,
    )


# ---- TCP health -------------------------------------------------------------------------------------


def tcp_health() -> dict[str, Any]:
    src = "source_k8s_namespace_name, source_k8s_workload_name"
    src_legend = "{{source_k8s_namespace_name}}/{{source_k8s_workload_name}}"
    ebpf = " (eBPF source only: the conntrack source does not see TCP internals.)"
    rtt = rate("otelflow_tcp_rtt_seconds_bucket")
    tcp_packets = rate("otelflow_flow_packets_total", 'network_transport="tcp"')
    panels = [
        timeseries(
            "Retransmitted segments/s by sending workload",
            "TCP segments the source retransmitted." + ebpf,
            [Target(f"topk($topn, sum by ({src}) ({rate('otelflow_tcp_retransmits_total')}))", src_legend)],
            "short",
        ),
        timeseries(
            "Retransmit ratio by sending workload",
            "Retransmitted segments / TCP packets sent." + ebpf,
            [
                Target(
                    f"topk($topn, sum by ({src}) ({rate('otelflow_tcp_retransmits_total')})"
                    f" / sum by ({src}) ({tcp_packets}))",
                    src_legend,
                )
            ],
            "percentunit",
        ),
        timeseries(
            "Resets/s by workload pair",
            "TCP RST segments sent by source to destination." + ebpf,
            [
                Target(
                    f"topk($topn, sum by ({WORKLOAD_PAIR}) ({rate('otelflow_tcp_resets_total')}))",
                    PAIR_LEGEND,
                )
            ],
            "short",
        ),
        timeseries(
            "Connections opened and closed/s",
            "All connections (source = client), any flow source.",
            [
                Target(f"sum({rate('otelflow_connections_opened_total')})", "opened", ref="A"),
                Target(f"sum({rate('otelflow_connections_closed_total')})", "closed", ref="B"),
            ],
            "cps",
        ),
        timeseries(
            "RTT quantiles, all flows",
            "Smoothed round-trip time seen by the sender, quantiles over the histogram." + ebpf,
            [
                Target(f"histogram_quantile({q}, sum by (le) ({rtt}))", f"p{int(q * 100)}", ref=r)
                for q, r in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
            ],
            "s",
        ),
        timeseries(
            "RTT p99 by workload pair",
            "The $topn slowest pairs by 99th-percentile smoothed RTT." + ebpf,
            [
                Target(
                    f"topk($topn, histogram_quantile(0.99, sum by (le, {WORKLOAD_PAIR}) ({rtt})))",
                    PAIR_LEGEND,
                )
            ],
            "s",
        ),
        timeseries(
            "Mean RTT by sending workload",
            "Mean of the observations (each: a flow direction's latest smoothed RTT in one poll)." + ebpf,
            [
                Target(
                    f"sum by ({src}) ({rate('otelflow_tcp_rtt_seconds_sum')})"
                    f" / sum by ({src}) ({rate('otelflow_tcp_rtt_seconds_count')})",
                    src_legend,
                )
            ],
            "s",
        ),
        Panel(
            "heatmap",
            "RTT distribution",
            "RTT observations per histogram bucket over time (one per flow direction per poll)." + ebpf,
            [Target(f"sum by (le) ({rtt})", "{{le}}", fmt="heatmap")],
            unit="s",
            options={"calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1},
        ),
    ]
    return dashboard(
        "otelflow-tcp-health",
        "otelflow / TCP health",
        "Retransmits, resets and round-trip times per workload (eBPF source).",
        panels,
        namespace=True,
        topn=True,
    )


# ---- the agent's own health -------------------------------------------------------------------------


def agent_health() -> dict[str, Any]:
    def agent(metric: str) -> str:
        return f"{metric}{{{CLUSTER}}}"

    def per_node(metric: str) -> str:
        return f"sum by (k8s_node_name) ({agent(metric)})"

    def rate_node(metric: str) -> str:
        return f"sum by (k8s_node_name) (rate({agent(metric)}[{RATE}]))"

    node = "{{k8s_node_name}}"
    panels = [
        stat(
            "Agents up",
            "Agents reporting (otelflow_agent_up).",
            Target(f"count({agent('otelflow_agent_up')})"),
            "short",
        ),
        stat(
            "Flow records/s",
            "Flow deltas processed per second, all agents.",
            Target(f"sum(rate({agent('otelflow_agent_flow_records_total')}[{RATE}]))"),
            "short",
        ),
        stat(
            "Failed export requests/s",
            "OTLP requests that failed, all agents (each retry counts).",
            Target(f"sum(rate({agent('otelflow_agent_export_failed_requests_total')}[{RATE}]))"),
            "reqps",
        ),
        stat(
            "Items dropped over the range",
            "Points and log records the agents gave up on during the time range.",
            Target(f"sum(increase({agent('otelflow_agent_export_dropped_items_total')}[$__range]))"),
            "short",
        ),
        table(
            "Agents and their flow source",
            "One row per agent node: the flow source in use, the one requested (auto, ebpf, conntrack) "
            "and why (requested, ebpf_ready, no_btf, bpf_denied, tc_attach_failed, tcx_attach_failed, "
            "ebpf_unavailable).",
            Target(f"sum by (k8s_node_name, source, requested, reason) ({agent('otelflow_agent_source')})"),
            "short",
            w=24,
        ),
        table(
            "eBPF attach backend by node",
            "One row per agent node: how the eBPF source attaches its TC programs (tcx: links first in "
            "each interface's tcx chain, Linux >= 6.6; tc: cls_bpf filters on clsact; none: the "
            "conntrack source).",
            Target(f"sum by (k8s_node_name, mode) ({agent('otelflow_agent_ebpf_attach')})"),
            "short",
            w=24,
        ),
        timeseries(
            "Flow records/s by node",
            "Flow deltas processed.",
            [Target(rate_node("otelflow_agent_flow_records_total"), node)],
            "short",
        ),
        timeseries(
            "Flows tracked by node",
            "Flows the source tracks now.",
            [Target(per_node("otelflow_agent_flows_tracked"), node)],
            "short",
        ),
        timeseries(
            "Conntrack table fill by node",
            "Entries in the node's conntrack table / its capacity (nf_conntrack_max). Near 1 the kernel "
            "drops new connections.",
            [
                Target(
                    f"{per_node('otelflow_agent_conntrack_table_entries')}"
                    f" / {per_node('otelflow_agent_conntrack_table_max')}",
                    node,
                )
            ],
            "percentunit",
        ),
        timeseries(
            "Conntrack problems/s by node",
            "Event socket overflows (each followed by a resync dump), flows that left without a DESTROY "
            "event (final bytes unknown), malformed netlink messages.",
            [
                Target(
                    rate_node("otelflow_agent_conntrack_event_overflows_total"), f"{node} overflows", ref="A"
                ),
                Target(rate_node("otelflow_agent_flows_vanished_total"), f"{node} vanished", ref="B"),
                Target(rate_node("otelflow_agent_parse_malformed_total"), f"{node} malformed", ref="C"),
            ],
            "short",
        ),
        timeseries(
            "OTLP requests/s by node",
            "Attempted, failed (each retry counts) and retried requests.",
            [
                Target(rate_node("otelflow_agent_export_requests_total"), f"{node} attempted", ref="A"),
                Target(rate_node("otelflow_agent_export_failed_requests_total"), f"{node} failed", ref="B"),
                Target(rate_node("otelflow_agent_export_retries_total"), f"{node} retries", ref="C"),
            ],
            "reqps",
        ),
        timeseries(
            "Items lost or replaced/s",
            "Dropped (by reason), rejected by the collector (partial success), and superseded (a queued "
            "cumulative point replaced by a newer one: no data lost).",
            [
                Target(
                    "sum by (k8s_node_name, reason) "
                    f"(rate({agent('otelflow_agent_export_dropped_items_total')}[{RATE}]))",
                    f"{node} dropped {{{{reason}}}}",
                    ref="A",
                ),
                Target(rate_node("otelflow_agent_export_rejected_items_total"), f"{node} rejected", ref="B"),
                Target(
                    rate_node("otelflow_agent_export_superseded_points_total"), f"{node} superseded", ref="C"
                ),
            ],
            "short",
        ),
        timeseries(
            "OTLP queue by node",
            "Bytes waiting to be sent.",
            [Target(per_node("otelflow_agent_export_queue_bytes"), node)],
            "bytes",
        ),
        timeseries(
            "Metric series by node",
            "Live series across flow metrics; overflow points/s: values folded into the overflow series "
            "because of the cardinality cap (export.metrics.max_series).",
            [
                Target(per_node("otelflow_agent_metric_series"), f"{node} series", ref="A"),
                Target(
                    rate_node("otelflow_agent_metric_overflow_points_total"), f"{node} overflow/s", ref="B"
                ),
            ],
            "short",
        ),
        timeseries(
            "Flow-log records filtered/s by node",
            "Records dropped by the log filters or sampling (export.logs.*).",
            [Target(rate_node("otelflow_agent_flow_logs_filtered_total"), node)],
            "short",
        ),
        timeseries(
            "Live-view evictions/s by node",
            "Open connections dropped from `otelflow top`'s table to stay under api.top_max_connections "
            "(the metrics and flow logs are not affected).",
            [Target(rate_node("otelflow_agent_top_evicted_total"), node)],
            "short",
        ),
        timeseries(
            "Kubernetes metadata staleness by node",
            "Time since the API server was last heard from (0 without Kubernetes).",
            [Target(per_node("otelflow_agent_metadata_staleness_seconds"), node)],
            "s",
        ),
        timeseries(
            "Addresses in the IP index by node",
            "Addresses the agent can name (pods, nodes, Services, inventory hosts).",
            [Target(per_node("otelflow_agent_index_addresses"), node)],
            "short",
        ),
        timeseries(
            "eBPF: interfaces and attach errors by node",
            "Interfaces the TC programs are attached to; failed attaches/s (that interface's traffic is "
            "counted only where it is seen elsewhere). Empty with the conntrack source.",
            [
                Target(per_node("otelflow_agent_ebpf_interfaces"), f"{node} interfaces", ref="A"),
                Target(
                    rate_node("otelflow_agent_ebpf_attach_errors_total"), f"{node} attach errors/s", ref="B"
                ),
            ],
            "short",
        ),
        timeseries(
            "eBPF: flow map fill by node",
            "Flows the last drain read / flows the map holds per interval. At 1 new flows are not "
            "counted (see dropped packets, reason map_full).",
            [
                Target(
                    f"{per_node('otelflow_agent_ebpf_map_entries')}"
                    f" / {per_node('otelflow_agent_ebpf_map_capacity')}",
                    node,
                )
            ],
            "percentunit",
        ),
        timeseries(
            "eBPF: uncounted packets and bytes/s by node",
            "Packets (and their bytes) the TC programs could not count, by reason (map_full, other).",
            [
                Target(
                    "sum by (k8s_node_name, reason) "
                    f"(rate({agent('otelflow_agent_ebpf_dropped_packets_total')}[{RATE}]))",
                    f"{node} packets {{{{reason}}}}",
                    ref="A",
                ),
                Target(
                    "sum by (k8s_node_name, reason) "
                    f"(rate({agent('otelflow_agent_ebpf_dropped_bytes_total')}[{RATE}]))",
                    f"{node} bytes {{{{reason}}}}",
                    ref="B",
                ),
            ],
            "short",
        ),
        timeseries(
            "eBPF: one-way counts conntrack did not name/s by node",
            "Counts paired by mirroring, without conntrack's NAT view.",
            [Target(rate_node("otelflow_agent_ebpf_unmatched_counts_total"), node)],
            "short",
        ),
        timeseries(
            "eBPF: lost TCP health events/s by node",
            "TCP health events lost, by reason (map_full, kernel_skipped: machine-wide, unjoined) and "
            "feature (retransmits, rtt, resets, state): the TCP health panels undercount by this much.",
            [
                Target(
                    "sum by (k8s_node_name, reason, feature) "
                    f"(rate({agent('otelflow_agent_ebpf_health_lost_events_total')}[{RATE}]))",
                    f"{node} {{{{reason}}}} {{{{feature}}}}",
                )
            ],
            "short",
        ),
    ]
    return dashboard(
        "otelflow-agent-health",
        "otelflow / Agent health",
        "The agents' own metrics (otelflow_agent_*), per node.",
        panels,
        namespace=False,
        topn=False,
    )


DASHBOARDS = {
    "service-map.json": service_map,
    "top-talkers.json": top_talkers,
    "inter-zone.json": inter_zone,
    "tcp-health.json": tcp_health,
    "agent-health.json": agent_health,
}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    for name in DASHBOARDS:
        (HERE / name).write_text(render(name))
        sys.stderr.write(f"wrote dashboards/{name}\n")


if __name__ == "__main__":
    main()
