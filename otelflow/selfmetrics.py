"""The agent's own health, gathered from its components' stats and rendered on /metrics.

Names, kinds and meanings come from otelflow.schema.SELF_METRICS (docs/telemetry.md lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from otelflow.promexp import escape_label_value
from otelflow.schema import SELF_METRICS


class SelfMetrics:
    def __init__(
        self,
        source: Any,
        export: Any,
        index_size: Callable[[], int],
        staleness: Callable[[], float] | None = None,
    ) -> None:
        self.source = source
        self.export = export
        self.index_size = index_size
        self.staleness = staleness or (lambda: 0.0)

    def values(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        src = self.source
        st = getattr(src, "stats", None)
        tr = getattr(getattr(src, "tracker", None), "stats", None)
        agg = self.export.aggregator.stats
        ex = self.export.exporter.stats if self.export.exporter else None
        logs = self.export.logs_encoder
        v: dict[str, list[tuple[dict[str, str], float]]] = {
            "otelflow_agent_up": [({"source": src.name}, 1)],
            "otelflow_agent_flow_records_total": [({}, agg.records)],
            "otelflow_agent_flows_tracked": [({}, tr.flows if tr else 0)],
            "otelflow_agent_flows_vanished_total": [({}, tr.vanished if tr else 0)],
            "otelflow_agent_conntrack_event_overflows_total": [({}, getattr(st, "event_overflows", 0))],
            "otelflow_agent_parse_malformed_total": [({}, getattr(st, "parse_malformed", 0))],
            "otelflow_agent_conntrack_table_entries": [({}, getattr(st, "table_entries", 0))],
            "otelflow_agent_conntrack_table_max": [({}, getattr(st, "table_max", 0))],
            "otelflow_agent_metric_series": [({}, agg.series)],
            "otelflow_agent_metric_overflow_points_total": [({}, agg.overflow_points)],
            "otelflow_agent_export_requests_total": [({}, ex.requests if ex else 0)],
            "otelflow_agent_export_failed_requests_total": [({}, ex.failed_requests if ex else 0)],
            "otelflow_agent_export_retries_total": [({}, ex.retries if ex else 0)],
            "otelflow_agent_export_dropped_items_total": (
                [({"reason": r}, n) for r, n in sorted(ex.by_reason.items())]
                if ex and ex.by_reason
                else [({}, 0)]
            ),
            "otelflow_agent_export_superseded_points_total": [({}, ex.superseded_items if ex else 0)],
            "otelflow_agent_export_rejected_items_total": [({}, ex.rejected_items if ex else 0)],
            "otelflow_agent_export_queue_bytes": [({}, ex.queue_bytes if ex else 0)],
            "otelflow_agent_flow_logs_filtered_total": [({}, logs.filtered if logs else 0)],
            "otelflow_agent_metadata_staleness_seconds": [({}, round(self.staleness(), 3))],
            "otelflow_agent_index_addresses": [({}, self.index_size())],
        }
        return v

    def render(self) -> str:
        values = self.values()
        out = []
        for m in SELF_METRICS:
            out.append(f"# HELP {m.name} {m.brief}")
            out.append(f"# TYPE {m.name} {m.kind}")
            for labels, val in values[m.name]:
                lab = ",".join(f'{k}="{escape_label_value(str(x))}"' for k, x in labels.items())
                out.append(f"{m.name}{{{lab}}} {val:g}" if lab else f"{m.name} {val:g}")
        return "\n".join(out) + "\n"
