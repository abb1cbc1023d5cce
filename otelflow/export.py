"""The export stage: aggregate decorated flows, export metrics each interval and flow logs as they
come, over OTLP, and serve the same series on the Prometheus endpoint.

It is a pipeline sink (``write`` per poll, ``tick`` after each poll, ``close`` at exit). One lock
guards the aggregator against the HTTP thread that renders /metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from otelflow.aggregate import Aggregator
from otelflow.decorate import DecoratedFlow
from otelflow.otlp.exporter import OtlpExporter
from otelflow.otlp.logs import LogsEncoder
from otelflow.otlp.metrics import MetricsEncoder
from otelflow.promexp import render

log = logging.getLogger(__name__)


class ExportStage:
    def __init__(
        self,
        aggregator: Aggregator,
        interval: float,
        metrics_encoder: MetricsEncoder | None = None,
        logs_encoder: LogsEncoder | None = None,
        exporter: OtlpExporter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.aggregator = aggregator
        self.interval = interval
        self.metrics_encoder = metrics_encoder
        self.logs_encoder = logs_encoder
        self.exporter = exporter
        self.clock = clock
        self.lock = threading.Lock()
        self.exports = 0
        self.extra: Callable[[], str] | None = None  # more /metrics text (the agent's own health)
        self._next = clock() + interval

    def write(self, batch: Sequence[DecoratedFlow]) -> None:
        with self.lock:
            self.aggregator.add(batch)
        if self.exporter and self.logs_encoder:
            items = self.logs_encoder.encode(batch)
            if items:
                self.exporter.submit(items)

    def tick(self) -> None:
        if self.clock() >= self._next:
            self._next += self.interval
            if self._next < self.clock():
                self._next = self.clock() + self.interval
            self.export_now()

    def export_now(self) -> None:
        with self.lock:
            snap = self.aggregator.snapshot()
            enc = self.metrics_encoder if self.exporter else None
            items = enc.encode(snap, time.time_ns()) if enc else []
            # while exports fail, nothing expires: the next delivered snapshot must still hold it all
            delivering = self.exporter is None or (
                self.exporter.stats.delivering and not self.exporter.stats.queue_bytes
            )
            self.aggregator.end_interval(expire=delivering)
        self.exports += 1
        if items and self.exporter:
            self.exporter.submit(items)

    def prometheus(self) -> str:
        with self.lock:
            text = render(self.aggregator.snapshot(), self.aggregator.pairs)
        return text + (self.extra() if self.extra else "")

    def close(self) -> None:
        self.export_now()
        if self.exporter:
            if not self.exporter.flush(10.0):
                log.warning("OTLP exporter could not flush its queue before exit")
            self.exporter.close()
