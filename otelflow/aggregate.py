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
* The RTT histogram (``otelflow.tcp.rtt``, eBPF source) uses the same series machinery: its
  ``total`` is the number of observations (so expiry and delta work unchanged), plus per-bucket
  counts, the sum and min/max, all in integer microseconds (exact); one observation per flow
  direction per record that has an RTT sample, counted where that direction's bytes are.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from otelflow.decorate import DecoratedFlow
from otelflow.meta.model import Peer
from otelflow.otlp import encode as pb
from otelflow.schema import FLOW_ATTRIBUTES, METRICS, Level, end_attributes, metric_attribute_names

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
    parts: tuple[int, int, int]  # attribute part ids (source end, destination end, flow); () = overflow
    head: bytes  # the OTLP data point's constant prefix: tag, length, attributes (computed once)
    start_ns: int
    total: int = 0  # cumulative
    exported: int = 0  # total at the last export (for delta temporality)
    idle: int = 0  # exports since the last change
    changed: bool = True


@dataclass(slots=True)
class HistSeries(Series):
    """A histogram series: ``total`` counts observations; values are integer microseconds. ``head``
    is the HistogramDataPoint's attribute block (field 9), not a NumberDataPoint prefix."""

    counts: list[int] = field(default_factory=list)  # per bucket: len(bounds) + 1 (the last: +Inf)
    sum_us: int = 0
    lo_us: int = 0  # smallest and largest observation since the last export (when total > exported)
    hi_us: int = 0
    min_us: int = 0  # over the series' life up to the last export (when exported > 0)
    max_us: int = 0
    exported_counts: list[int] = field(default_factory=list)  # at the last export (delta temporality)
    exported_sum_us: int = 0

    def lifetime_min_max(self) -> tuple[int, int]:
        """Min and max over every observation (the series has at least one)."""
        if not self.exported:
            return self.lo_us, self.hi_us
        if self.total == self.exported:
            return self.min_us, self.max_us
        return min(self.min_us, self.lo_us), max(self.max_us, self.hi_us)

    def mark_exported(self) -> None:
        """Before ``exported = total``: fold this interval's min/max in and remember the buckets."""
        if self.total != self.exported:
            self.min_us, self.max_us = self.lifetime_min_max()
            self.exported_counts = self.counts.copy()
            self.exported_sum_us = self.sum_us


@dataclass(slots=True)
class AggregatorStats:
    records: int = 0
    series: int = 0
    overflow_points: int = 0
    expired_series: int = 0


@dataclass(slots=True)
class MetricSeries:
    name: str
    series: dict[tuple[int, int, int], Series] = field(default_factory=dict)
    overflow: Series | None = None
    bounds_us: tuple[int, ...] = ()  # a histogram's bucket bounds in microseconds; () = a counter


class Aggregator:
    METRIC_NAMES = (
        "otelflow.flow.bytes",
        "otelflow.flow.packets",
        "otelflow.flow.interzone.bytes",
        "otelflow.connections.opened",
        "otelflow.connections.closed",
        "otelflow.connections.active",
        "otelflow.tcp.retransmits",
        "otelflow.tcp.resets",
        "otelflow.tcp.rtt",
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
        selected = set(names) - set(exclude)
        ends = end_attributes("flow")
        roles = (
            [f"source.{a.name}" for a in ends],
            [f"destination.{a.name}" for a in ends],
            [a.name for a in FLOW_ATTRIBUTES],
        )
        # per role (source end, destination end, flow): which positions are exported, under which keys
        self._idx = tuple(tuple(i for i, n in enumerate(r) if n in selected) for r in roles)
        self._keys = tuple(tuple(r[i] for i in idx) for r, idx in zip(roles, self._idx, strict=True))
        self.attribute_names = tuple(k for keys in self._keys for k in keys)
        self._uses_address = any(n.endswith(".address") for n in self.attribute_names)
        self._ends = ends
        self._kv = pb.KvCache(7)
        self._kv_hist = pb.KvCache(9)  # HistogramDataPoint.attributes is field 9
        # peer -> (id as source, id as destination); flow attrs -> id; id -> (pairs, encoded block).
        # Series keys are (source id, destination id, flow id): three small ints, cheap to hash.
        self._end_cache: dict[tuple[str, ...], tuple[int, int]] = {}
        self._end_by_peer: dict[int, tuple[Peer, tuple[int, int]]] = {}  # see _end_of
        self._flow_cache: dict[tuple[str | int, ...], int] = {}
        self._part_ids: dict[tuple[int, tuple[object, ...]], int] = {}
        self._parts: list[tuple[tuple[tuple[str, str | int], ...], bytes]] = []
        bounds = {m.name: tuple(round(b * 1e6) for b in m.bounds) for m in METRICS}
        self.metrics = {n: MetricSeries(n, bounds_us=bounds[n]) for n in self.METRIC_NAMES}
        self._retransmits = self.metrics["otelflow.tcp.retransmits"]
        self._resets = self.metrics["otelflow.tcp.resets"]
        self._rtt = self.metrics["otelflow.tcp.rtt"]

    # ---- attribute values ----------------------------------------------------------------------
    def _end(self, p: Peer, address: str) -> tuple[int, int]:
        """Part ids of an end's exported values as a source and as a destination (cached per peer)."""
        addr = address if self._uses_address and p.in_cluster else ""
        key = (p.name, p.namespace, p.peer_class, p.node, addr)  # identifies the peer; cheaper to hash
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
                "address": addr,
            }
            if kind_attr:
                by_name[kind_attr] = p.workload_name
            full = tuple(by_name.get(a.name, "") for a in self._ends)
            v = (
                self._part(0, tuple(full[i] for i in self._idx[0])),
                self._part(1, tuple(full[i] for i in self._idx[1])),
            )
            self._end_cache[key] = v
        return v

    def _end_of(self, p: Peer) -> tuple[int, int]:
        """``_end`` for a level without addresses, remembered per Peer object (the IP index hands out
        one object per owner; the object is kept in the value so its id cannot be reused)."""
        ids = self._end(p, "")
        if len(self._end_by_peer) >= 100_000:
            self._end_by_peer.clear()
        self._end_by_peer[id(p)] = (p, ids)
        return ids

    def _flow(self, vals: tuple[str | int, ...]) -> int:
        """Part id of the flow attributes (transport, family number, server port, Service name)."""
        v = self._flow_cache.get(vals)
        if v is None:
            transport, family, port, service = vals
            named = (transport, f"ipv{family}", port, service)
            v = self._flow_cache[vals] = self._part(2, tuple(named[i] for i in self._idx[2]))
        return v

    def _part(self, role: int, values: tuple[object, ...]) -> int:
        key = (role, values)
        pid = self._part_ids.get(key)
        if pid is None:
            pairs = tuple(
                (k, v)  # type: ignore[misc]
                for k, v in zip(self._keys[role], values, strict=True)
                if v != "" and v != 0
            )
            pid = self._part_ids[key] = len(self._parts)
            self._parts.append((pairs, self._kv.block(pairs)))  # type: ignore[arg-type]
        return pid

    # ---- input -----------------------------------------------------------------------------------
    def add(self, batch: Iterable[DecoratedFlow]) -> None:
        """Count a batch into the series. The hot path of the agent: the series of each metric are
        looked up inline (a method call per value cost more than the rest); ``_series`` makes new
        ones."""
        now = self.clock_ns()
        m = self.metrics
        nbytes, npackets, nzone = (m[n] for n in self.METRIC_NAMES[:3])
        nopened, nclosed, nactive = (m[n] for n in self.METRIC_NAMES[3:6])
        bytes_get, packets_get, zone_get = nbytes.series.get, npackets.series.get, nzone.series.get
        opened_get, closed_get, active_get = nopened.series.get, nclosed.series.get, nactive.series.get
        new, end, flow = self._series, self._end, self._flow
        by_peer = None if self._uses_address else self._end_by_peer
        records = 0
        for d in batch:
            records += 1
            f, c, s = d.flow, d.client, d.server
            fl = flow((f.transport, f.family, f.server_port, d.service.name if d.service else ""))
            if by_peer is None:  # an end's ids depend on its address
                c_src, c_dst = end(c, f.client_ip)
                s_src, s_dst = end(s, f.server_ip)
            else:  # they depend on the peer only: look them up by identity (cheaper than by values)
                hit = by_peer.get(id(c))
                c_src, c_dst = hit[1] if hit is not None and hit[0] is c else self._end_of(c)
                hit = by_peer.get(id(s))
                s_src, s_dst = hit[1] if hit is not None and hit[0] is s else self._end_of(s)
            interzone = c.zone and s.zone and c.zone != s.zone
            # None: no counters (conntrack accounting off): no series. 0: the series exists, unchanged.
            if d.count_c2s:
                k = (c_src, s_dst, fl)
                v = f.bytes_c2s
                if v is not None:
                    ser = bytes_get(k) or new(nbytes, k, now)
                    if v:
                        ser.total += v
                        ser.changed = True
                        if interzone:
                            ser = zone_get(k) or new(nzone, k, now)
                            ser.total += v
                            ser.changed = True
                v = f.packets_c2s
                if v is not None:
                    ser = packets_get(k) or new(npackets, k, now)
                    if v:
                        ser.total += v
                        ser.changed = True
                if f.opened or f.closed:  # connections: where the client->server bytes are counted
                    ser = opened_get(k) or new(nopened, k, now)
                    if f.opened:
                        ser.total += 1
                        ser.changed = True
                    ser = closed_get(k) or new(nclosed, k, now)
                    if f.closed:
                        ser.total += 1
                        ser.changed = True
                    ser = active_get(k) or new(nactive, k, now)
                    if f.opened != f.closed:
                        ser.total += 1 if f.opened else -1
                        ser.changed = True
            if d.count_s2c:
                k = (s_src, c_dst, fl)
                v = f.bytes_s2c
                if v is not None:
                    ser = bytes_get(k) or new(nbytes, k, now)
                    if v:
                        ser.total += v
                        ser.changed = True
                        if interzone:
                            ser = zone_get(k) or new(nzone, k, now)
                            ser.total += v
                            ser.changed = True
                v = f.packets_s2c
                if v is not None:
                    ser = packets_get(k) or new(npackets, k, now)
                    if v:
                        ser.total += v
                        ser.changed = True
            if f.retransmits_c2s is not None and f.transport == "tcp":  # TCP health (eBPF source)
                self._tcp(d, (c_src, s_dst, fl), (s_src, c_dst, fl), now)
        self.stats.records += records

    def _tcp(self, d: DecoratedFlow, c2s: tuple[int, int, int], s2c: tuple[int, int, int], now: int) -> None:
        """Retransmits and resets sent by each end, and the RTT its socket measured (one observation
        when the record has a sample), counted where that direction's bytes are."""
        f = d.flow
        if d.count_c2s:
            self._health(c2s, f.retransmits_c2s, f.resets_c2s, f.rtt_us_c2s, now)
        if d.count_s2c:
            self._health(s2c, f.retransmits_s2c, f.resets_s2c, f.rtt_us_s2c, now)

    def _health(
        self, k: tuple[int, int, int], retrans: int | None, resets: int | None, rtt_us: int | None, now: int
    ) -> None:
        ms = self._retransmits
        ser = ms.series.get(k) or self._series(ms, k, now)
        if retrans:
            ser.total += retrans
            ser.changed = True
        ms = self._resets
        ser = ms.series.get(k) or self._series(ms, k, now)
        if resets:
            ser.total += resets
            ser.changed = True
        if rtt_us is None:
            return
        ms = self._rtt
        h = ms.series.get(k) or self._series(ms, k, now)
        assert isinstance(h, HistSeries)
        if h.total == h.exported:  # the first observation since the last export: min/max restart
            h.lo_us = h.hi_us = rtt_us
        elif rtt_us < h.lo_us:
            h.lo_us = rtt_us
        elif rtt_us > h.hi_us:
            h.hi_us = rtt_us
        h.counts[bisect_left(ms.bounds_us, rtt_us)] += 1
        h.total += 1
        h.sum_us += rtt_us
        h.changed = True

    def _series(self, ms: MetricSeries, key: tuple[int, int, int], now: int) -> Series:
        """A new series for `key`, or the overflow series once the metric holds max_series."""
        if len(ms.series) >= self.max_series:
            if ms.overflow is None:
                if ms.bounds_us:
                    block = pb.attributes(((OVERFLOW_KEY, "true"),), field=9, bools={OVERFLOW_KEY})
                    ms.overflow = self._hist((-1, -1, -1), block, len(ms.bounds_us), now)
                else:
                    block = pb.attributes(((OVERFLOW_KEY, "true"),), field=7, bools={OVERFLOW_KEY})
                    ms.overflow = Series((-1, -1, -1), pb.point_head(block), now)
            self.stats.overflow_points += 1
            return ms.overflow
        parts = self._parts
        if ms.bounds_us:
            pairs = parts[key[0]][0] + parts[key[1]][0] + parts[key[2]][0]
            s: Series = self._hist(key, self._kv_hist.block(pairs), len(ms.bounds_us), now)
        else:
            s = Series(key, pb.point_head(parts[key[0]][1], parts[key[1]][1], parts[key[2]][1]), now)
        ms.series[key] = s
        self.stats.series += 1
        return s

    @staticmethod
    def _hist(key: tuple[int, int, int], block: bytes, nbounds: int, now: int) -> HistSeries:
        n = nbounds + 1
        return HistSeries(key, block, now, counts=[0] * n, exported_counts=[0] * n)

    def pairs(self, s: Series) -> tuple[tuple[str, str | int], ...]:
        """A series' exported (key, value) attribute pairs (for Prometheus)."""
        if s.parts[0] < 0:
            return ((OVERFLOW_KEY, "true"),)
        p = self._parts
        return p[s.parts[0]][0] + p[s.parts[1]][0] + p[s.parts[2]][0]

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

    def end_interval(self, expire: bool = True) -> None:
        """Called after each export: mark exported totals, age and expire idle series. ``expire``
        False (the last exports are not delivered yet) keeps every series: a flow that lived and
        ended while the collector was away must still reach it in a later cumulative snapshot."""
        for ms in self.metrics.values():
            if ms.bounds_us:  # histograms: fold this interval's min/max, remember the buckets
                for h in ms.series.values():
                    cast(HistSeries, h).mark_exported()
                if ms.overflow is not None:
                    cast(HistSeries, ms.overflow).mark_exported()
            dead = []
            for key, s in ms.series.items():
                s.exported = s.total
                if s.changed:
                    s.idle = 0
                    s.changed = False
                elif expire:
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
        self._compact()

    def _compact(self) -> None:
        """Bound the id tables: when they outgrow the live series, rebuild them from what is live."""
        if len(self._parts) < 4 * self.max_series + 10_000:
            return
        live = {i for ms in self.metrics.values() for key in ms.series for i in key}
        remap = {old: new for new, old in enumerate(sorted(live))}
        self._parts = [self._parts[old] for old in sorted(live)]
        self._part_ids = {k: remap[v] for k, v in self._part_ids.items() if v in remap}
        self._end_cache = {
            k: (remap[a], remap[b]) for k, (a, b) in self._end_cache.items() if a in remap and b in remap
        }
        self._flow_cache = {k: remap[v] for k, v in self._flow_cache.items() if v in remap}
        self._end_by_peer.clear()
        for ms in self.metrics.values():
            ms.series = {(remap[a], remap[b], remap[c]): s for (a, b, c), s in ms.series.items()}
            for s in ms.series.values():
                a, b, c = s.parts
                s.parts = (remap[a], remap[b], remap[c])


FLOW_ATTRIBUTE_NAMES = tuple(a.name for a in FLOW_ATTRIBUTES)
