"""Aggregator snapshot -> ExportMetricsServiceRequest bytes, split under the collector's limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from otelflow.aggregate import HistSeries, Series
from otelflow.otlp import encode as pb
from otelflow.otlp.exporter import Item
from otelflow.schema import METRICS

DEFAULT_MAX_REQUEST = 3 << 20  # under a collector's default 4 MiB gRPC limit, with room for framing


class MetricsEncoder:
    def __init__(
        self,
        resource_attrs: Sequence[tuple[str, str]],
        scope_name: str,
        scope_version: str,
        temporality: str = "cumulative",
        max_request_bytes: int = DEFAULT_MAX_REQUEST,
    ) -> None:
        self.resource = pb.resource(resource_attrs)
        self.scope = pb.scope(scope_name, scope_version)
        self.delta = temporality == "delta"
        self.max_request_bytes = max_request_bytes
        self.defs = {m.name: m for m in METRICS}
        self.heads = {m.name: pb.metric_head(m.name, m.brief, m.unit) for m in METRICS}
        self.bounds = {m.name: pb.histogram_bounds(m.bounds) for m in METRICS if m.kind == "histogram"}
        self._generation = 0
        self._last_export_ns = 0

    def encode(self, snapshot: dict[str, list[Series]], now_ns: int) -> list[Item]:
        """One export round: every live series (cumulative) or every changed one (delta). Histograms:
        cumulative, or with delta temporality the observations since the last export."""
        self._generation += 1
        metric_msgs: list[tuple[int, bytes]] = []  # (points, Metric bytes)
        tail = pb.point_tail
        for name, series in snapshot.items():
            d = self.defs[name]
            limit = self.max_request_bytes - len(self.resource) - len(self.scope) - 256
            if d.kind == "histogram":
                temporality = pb.TEMPORALITY_DELTA if self.delta else pb.TEMPORALITY_CUMULATIVE
                for group in pb.chunks(self._histogram_points(name, series, now_ns), limit):
                    metric_msgs.append(
                        (len(group), pb.histogram_metric(self.heads[name], group, temporality))
                    )
                continue
            monotonic = d.kind == "counter"
            delta = self.delta and monotonic  # an up-down counter stays cumulative
            temporality = pb.TEMPORALITY_DELTA if delta else pb.TEMPORALITY_CUMULATIVE
            points = []
            for s in series:
                if delta:
                    value = s.total - s.exported
                    if not value:
                        continue
                    start = max(s.start_ns, self._last_export_ns) if self._last_export_ns else s.start_ns
                else:
                    value, start = s.total, s.start_ns
                points.append(s.head + tail(start, now_ns, value))
            for group in pb.chunks(points, limit):
                msg = pb.sum_metric(self.heads[name], group, temporality, monotonic, framed=True)
                metric_msgs.append((len(group), msg))
        self._last_export_ns = now_ns
        items: list[Item] = []
        batch: list[bytes] = []
        count = size = 0
        for n, m in metric_msgs:
            if batch and size + len(m) > self.max_request_bytes:
                items.append(self._item(batch, count))
                batch, count, size = [], 0, 0
            batch.append(m)
            count += n
            size += len(m) + 8
        if batch:
            items.append(self._item(batch, count))
        return items

    def _histogram_points(self, name: str, series: list[Series], now_ns: int) -> list[bytes]:
        """HistogramDataPoints (framed) of one histogram metric; values are kept in microseconds."""
        bounds, points, last = self.bounds[name], [], self._last_export_ns
        for s in series:
            h = cast(HistSeries, s)
            if self.delta:
                count = h.total - h.exported
                if not count:
                    continue
                start = max(h.start_ns, last) if last else h.start_ns
                counts = [a - b for a, b in zip(h.counts, h.exported_counts, strict=True)]
                sum_us, (lo, hi) = h.sum_us - h.exported_sum_us, (h.lo_us, h.hi_us)
            else:
                count, start, counts, sum_us = h.total, h.start_ns, h.counts, h.sum_us
                lo, hi = h.lifetime_min_max()
            mm = (lo / 1e6, hi / 1e6)
            points.append(pb.histogram_point(h.head, start, now_ns, count, sum_us / 1e6, counts, bounds, mm))
        return points

    def _item(self, metrics: list[bytes], count: int) -> Item:
        framed: list[bytes] = []
        for m in metrics:
            framed += (pb.item_frame(len(m)), m)
        body = pb.request(self.resource, self.scope, framed, sum(map(len, framed)))
        return Item("metrics", body, count, cumulative=not self.delta, generation=self._generation)
