"""The agent's own health, gathered from its components' stats and rendered on /metrics.

Names, kinds and meanings come from otelflow.schema.SELF_METRICS (docs/telemetry.md lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from otelflow.promexp import escape_label_value
from otelflow.schema import HEALTH_FEATURES, HEALTH_LOSS_REASONS, SELF_METRICS


class SelfMetrics:
    def __init__(
        self,
        source: Any,
        export: Any,
        index_size: Callable[[], int],
        staleness: Callable[[], float] | None = None,
        selection: tuple[str, str] = ("", ""),  # (requested source, reason code)
        live: Any = None,  # the LiveView behind /api/v1/top (None when api.listen is off)
    ) -> None:
        self.live = live
        self.source = source
        self.selection = selection
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
            "otelflow_agent_top_evicted_total": [({}, self.live.evicted if self.live else 0)],
            "otelflow_agent_metadata_staleness_seconds": [({}, round(self.staleness(), 3))],
            "otelflow_agent_index_addresses": [({}, self.index_size())],
            "otelflow_agent_source": [
                ({"source": src.name, "requested": self.selection[0], "reason": self.selection[1]}, 1)
            ],
        }
        eb = st if src.name == "ebpf" else None
        v["otelflow_agent_ebpf_attach"] = [({"mode": getattr(eb, "attach_mode", "") or "none"}, 1)]
        v["otelflow_agent_ebpf_interfaces"] = [({}, getattr(eb, "interfaces", 0))]
        v["otelflow_agent_ebpf_attach_errors_total"] = [({}, getattr(eb, "attach_errors", 0))]
        v["otelflow_agent_ebpf_map_entries"] = [({}, getattr(eb, "map_entries", 0))]
        v["otelflow_agent_ebpf_map_capacity"] = [({}, getattr(eb, "map_capacity", 0))]
        full_p = getattr(eb, "dropped_map_full_packets", 0)
        full_b = getattr(eb, "dropped_map_full_bytes", 0)
        v["otelflow_agent_ebpf_dropped_packets_total"] = [
            ({"reason": "map_full"}, full_p),
            ({"reason": "other"}, getattr(eb, "dropped_packets", 0) - full_p),
        ]
        v["otelflow_agent_ebpf_dropped_bytes_total"] = [
            ({"reason": "map_full"}, full_b),
            ({"reason": "other"}, getattr(eb, "dropped_bytes", 0) - full_b),
        ]
        v["otelflow_agent_ebpf_unmatched_counts_total"] = [({}, getattr(eb, "unmatched", 0))]
        lost = getattr(eb, "health_lost", None) or {}
        v["otelflow_agent_ebpf_health_lost_events_total"] = [
            ({"reason": r, "feature": f}, lost.get(r, {}).get(f, 0))
            for r in HEALTH_LOSS_REASONS
            for f in HEALTH_FEATURES
        ]
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


def otel_name(prom_name: str) -> str:
    """otelflow_agent_export_retries_total -> otelflow.agent.export_retries (the SDK's Prometheus
    translation turns it back into the /metrics name)."""
    base = prom_name.removesuffix("_total").removeprefix("otelflow_agent_")
    return f"otelflow.agent.{base}"


class SdkSelfTelemetry:
    """The same health values over OTLP, through the OpenTelemetry SDK (low cardinality, one reader
    on the export interval). The flow data never goes through the SDK (too slow for it)."""

    def __init__(
        self, selfmetrics: SelfMetrics, resource: list[tuple[str, str]], otlp: Any, interval: float
    ) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        from otelflow import __version__

        if otlp.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            insecure = otlp.insecure or otlp.endpoint.startswith("http://")
            creds = None
            if not insecure:
                import grpc

                from otelflow.otlp.exporter import read_file

                creds = grpc.ssl_channel_credentials(
                    read_file(otlp.certificate),
                    read_file(otlp.client_key),
                    read_file(otlp.client_certificate),
                )
            exporter = OTLPMetricExporter(
                endpoint=otlp.endpoint,
                insecure=insecure,
                credentials=creds,
                headers=dict(otlp.headers) or None,
                timeout=otlp.timeout,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpExporter,
            )

            exporter = HttpExporter(
                endpoint=otlp.endpoint.rstrip("/") + "/v1/metrics",
                headers=dict(otlp.headers) or None,
                timeout=otlp.timeout,
                certificate_file=otlp.certificate or None,
                client_certificate_file=otlp.client_certificate or None,
                client_key_file=otlp.client_key or None,
            )
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval * 1000)
        self.provider = MeterProvider(resource=Resource.create(dict(resource)), metric_readers=[reader])
        meter = self.provider.get_meter("otelflow.agent", __version__)
        self._values: dict[str, list[tuple[dict[str, str], float]]] = {}

        def callback_for(name: str) -> Any:
            def cb(options: CallbackOptions) -> list[Observation]:
                if name == SELF_METRICS[0].name:  # refresh once per collection
                    self._values = selfmetrics.values()
                return [Observation(v, attrs) for attrs, v in self._values.get(name, [])]

            return cb

        for m in SELF_METRICS:
            create = meter.create_observable_counter if m.kind == "counter" else meter.create_observable_gauge
            create(otel_name(m.name), callbacks=[callback_for(m.name)], description=m.brief)

    def close(self) -> None:
        self.provider.shutdown()
