"""Aggregation: decorated flow deltas -> metric series, per export interval.

* Each record contributes up to two directions: client->server bytes (source = client) when this
  node owns them, server->client bytes (source = server) likewise (count-once). Connections are
  counted once, where the client->server bytes are, with source = client and destination = server.
* A series is identified by its attribute values at the chosen level (workload, pod or flow) after
  include/exclude; the values tuple is interned and its OTLP and Prometheus encodings are computed
  once, when the series is born (the hot path only adds integers).
* Totals are always kept cumulative; delta temporality is derived at export time. A series idle for
  ``idle_intervals`` exports is forgotten (memory is bounded; a returning series restarts with a new
  start time, as OTLP cumulative semantics allow).
* Each metric holds at most ``max_series`` series; past that, values go to one overflow series with
  ``otel.metric.overflow=true`` and the points are counted in ``stats.overflow_points``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from otelflow.decorate import DecoratedFlow
from otelflow.meta.model import Peer
from otelflow.otlp import encode as pb
from otelflow.schema import FLOW_ATTRIBUTES, Level, end_attributes, metric_attribute_names

OVERFLOW_KEY = "otel.metric.overflow"
WORKLOAD_KIND_ATTR = {
    "Deployment": "k8s.deployment.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
}


@dataclass(slots=True)
class Series:
    attrs: tuple[tuple[str, str | int], ...]  # exported (key, value) pairs, empty values dropped
    attr_bytes: bytes  # OTLP-encoded KeyValue list (NumberDataPoint.attributes), computed once
    start_ns: int
    total: int = 0  # cumulative
    exported: int = 0  # total at the last export (for delta temporality)
    idle: int = 0  # exports since the last change
    changed: bool = True


@dataclass(slots=True)
class AggregatorStats:
    records: int = 0
    series: int = 0
    overflow_points: int = 0
    expired_series: int = 0


@dataclass(slots=True)
class MetricSeries:
    name: str
    series: dict[tuple[object, ...], Series] = field(default_factory=dict)
    overflow: Series | None = None


class Aggregator:
    METRIC_NAMES = (
        "otelflow.flow.bytes",
        "otelflow.flow.packets",
        "otelflow.flow.interzone.bytes",
        "otelflow.connections.opened",
        "otelflow.connections.closed",
        "otelflow.connections.active",
    )

    def __init__(
        self,
        level: Level = "workload",
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        max_series: int = 10_000,
        idle_intervals: int = 5,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.level = level
        self.max_series = max_series
        self.idle_intervals = idle_intervals
        self.clock_ns = clock_ns
        self.stats = AggregatorStats()
        names = list(metric_attribute_names(level))
        # include may add finer-level attributes; exclude removes any
        for extra in include:
            if extra not in names and extra in metric_attribute_names("flow"):
                names.append(extra)
        self.attribute_names = tuple(n for n in names if n not in set(exclude))
        full = metric_attribute_names("flow")
        self._pick = tuple(full.index(n) for n in self.attribute_names)
        self._ends = end_attributes("flow")
        self._end_cache: dict[tuple[Peer, str], tuple[str, ...]] = {}
        self.metrics = {n: MetricSeries(n) for n in self.METRIC_NAMES}
        self._interned: dict[tuple[object, ...], tuple[tuple[tuple[str, str | int], ...], bytes]] = {}

    # ---- attribute values ----------------------------------------------------------------------
    def _end(self, p: Peer, address: str) -> tuple[str, ...]:
        key = (p, address if p.in_cluster else "")
        v = self._end_cache.get(key)
        if v is None:
            kind_attr = WORKLOAD_KIND_ATTR.get(p.workload_kind, "")
            by_name = {
                "k8s.namespace.name": p.namespace,
                "k8s.workload.name": p.workload_name,
                "k8s.workload.kind": p.workload_kind,
                "cloud.availability_zone": p.zone,
                "cloud.region": p.region,
                "otelflow.peer.class": p.peer_class,
                "k8s.pod.name": p.name if p.kind == "pod" else "",
                "k8s.node.name": p.node,
                "k8s.pod.uid": p.uid,
                "address": key[1],
            }
            if kind_attr:
                by_name[kind_attr] = p.workload_name
            v = tuple(by_name.get(a.name, "") for a in self._ends)
            if len(self._end_cache) > 100_000:
                self._end_cache.clear()
            self._end_cache[key] = v
        return v

    def _key(
        self, src: tuple[str, ...], dst: tuple[str, ...], flow: tuple[str | int, ...]
    ) -> tuple[object, ...]:
        full = (*src, *dst, *flow)
        return tuple(full[i] for i in self._pick)

    def _intern(self, key: tuple[object, ...]) -> tuple[tuple[tuple[str, str | int], ...], bytes]:
        got = self._interned.get(key)
        if got is None:
            pairs = tuple(
                (n, v) for n, v in zip(self.attribute_names, key, strict=True) if v != "" and v != 0
            )
            got = (pairs, pb.attributes(pairs, field=7))  # type: ignore[arg-type]
            self._interned[key] = got
        return got

    # ---- input -----------------------------------------------------------------------------------
    def add(self, batch: Iterable[DecoratedFlow]) -> None:
        now = self.clock_ns()
        m = self.metrics
        for d in batch:
            self.stats.records += 1
            f = d.flow
            flow_vals = (f.transport, f"ipv{f.family}", f.server_port, d.service.name if d.service else "")
            c = self._end(d.client, f.client_ip)
            s = self._end(d.server, f.server_ip)
            if d.count_c2s:
                k = self._key(c, s, flow_vals)
                self._bump(m["otelflow.flow.bytes"], k, f.bytes_c2s, now)
                self._bump(m["otelflow.flow.packets"], k, f.packets_c2s, now)
                if f.bytes_c2s and d.client.zone and d.server.zone and d.client.zone != d.server.zone:
                    self._bump(m["otelflow.flow.interzone.bytes"], k, f.bytes_c2s, now)
                if f.opened or f.closed:
                    self._bump(m["otelflow.connections.opened"], k, int(f.opened), now)
                    self._bump(m["otelflow.connections.closed"], k, int(f.closed), now)
                    self._bump(m["otelflow.connections.active"], k, int(f.opened) - int(f.closed), now)
            if d.count_s2c:
                k = self._key(s, c, flow_vals)
                self._bump(m["otelflow.flow.bytes"], k, f.bytes_s2c, now)
                self._bump(m["otelflow.flow.packets"], k, f.packets_s2c, now)
                if f.bytes_s2c and d.client.zone and d.server.zone and d.client.zone != d.server.zone:
                    self._bump(m["otelflow.flow.interzone.bytes"], k, f.bytes_s2c, now)

    def _bump(self, ms: MetricSeries, key: tuple[object, ...], value: int | None, now: int) -> None:
        if value is None:
            return  # no counters (conntrack accounting off)
        s = ms.series.get(key)
        if s is None:
            if len(ms.series) >= self.max_series:
                if ms.overflow is None:
                    pairs = ((OVERFLOW_KEY, "true"),)
                    ms.overflow = Series(pairs, pb.attributes(pairs, field=7, bools={OVERFLOW_KEY}), now)  # type: ignore[arg-type]
                s = ms.overflow
                self.stats.overflow_points += 1
            else:
                pairs, enc = self._intern(key)
                s = Series(pairs, enc, now)
                ms.series[key] = s
                self.stats.series += 1
        if value:
            s.total += value
            s.changed = True

    # ---- output ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, list[Series]]:
        """Every live series per metric (cumulative totals; for Prometheus and exports)."""
        out: dict[str, list[Series]] = {}
        for name, ms in self.metrics.items():
            live = list(ms.series.values())
            if ms.overflow is not None:
                live.append(ms.overflow)
            out[name] = live
        return out

    def end_interval(self) -> None:
        """Called after each export: mark exported totals, age and expire idle series."""
        for ms in self.metrics.values():
            dead = []
            for key, s in ms.series.items():
                s.exported = s.total
                if s.changed:
                    s.idle = 0
                    s.changed = False
                else:
                    s.idle += 1
                    if s.idle >= self.idle_intervals and not (
                        ms.name == "otelflow.connections.active" and s.total
                    ):
                        dead.append(key)
            for key in dead:
                del ms.series[key]
                self.stats.expired_series += 1
            if ms.overflow is not None:
                ms.overflow.exported = ms.overflow.total
                ms.overflow.changed = False
        self.stats.series = sum(len(ms.series) for ms in self.metrics.values())
        if len(self._interned) > 4 * self.max_series * len(self.metrics):
            self._interned.clear()


FLOW_ATTRIBUTE_NAMES = tuple(a.name for a in FLOW_ATTRIBUTES)
