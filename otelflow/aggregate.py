"""Aggregation: decorated flow deltas -> metric series, per export interval.

* Each record contributes up to two directions: client->server bytes (source = client) when this
  node owns them, server->client bytes (source = server) likewise (count-once). Connections are
  counted once, where the client->server bytes are, with source = client and destination = server.
* A series is identified by its attribute values at the chosen level (workload, pod or flow) after
  include/exclude; the values tuple is interned and its OTLP and Prometheus encodings are computed
  once, when the series is born (the hot path only adds integers).
* Hot path (``add``): one lookup per record direction gives the series key's bundle: the key's
  series in every metric and the values of the current batch not yet added to them, which ``add``
  folds in before it returns (after ``add``, every series is up to date). With eBPF-shaped records
  this is about twice as fast as a dict lookup per metric and value (bench/otlp_encode.py).
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
from typing import Any, cast

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


# A bundle: one series key's series in every metric (a slot per metric, in METRIC_NAMES order; None:
# not looked up yet, expired, or overflowed), then the key itself (slot KEY). The hot path looks a
# record direction's bundle up once instead of once per metric. A slot only ever holds the series
# that ``metrics[name].series[key]`` holds: expiry clears the slot; an overflowed value is never kept
# in a slot, so the key gets its own series once there is room again, as without bundles.
Bundle = list[Any]
KEY = 9
# then a pending sum per counter slot i at 10 + i (bytes, packets, interzone bytes, retransmits and
# resets: the values the hot path adds; connections go straight to their series), the pending RTT
# observations, and whether the bundle is in this batch's fold list
RTTS = 18
DIRTY = 19


def _add(s: Series, v: int) -> None:
    s.total += v
    s.changed = True


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
        self._metric_list = [self.metrics[n] for n in self.METRIC_NAMES]  # by bundle slot
        self._rtt = self.metrics["otelflow.tcp.rtt"]
        # series key -> its bundle (see Bundle); empty bundles are dropped when they pile up
        self._bundles: dict[tuple[int, int, int], Bundle] = {}
        self._bundles_kept = 0  # bundles after the last drop of empty ones

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
        """Count a batch into the series. The hot path of the agent, written out inline on purpose
        (a method call per value cost more than the rest): per record and direction one lookup
        gives the key's bundle (``_bundle`` makes it); a value goes into its bundle's
        pending sum (or RTT list) once its series exists (``_put`` makes it, and counts a value
        that overflows at once), and ``_fold`` moves the pending values into the series before
        returning. The two directions' blocks are the same code on the client->server and the
        server->client fields; connections (fewer values) go straight to their series."""
        now = self.clock_ns()
        by_peer = None if self._uses_address else self._end_by_peer.get
        flow_get, bundles_get, bundle = self._flow_cache.get, self._bundles.get, self._bundle
        slot, put, put_rtt, add = self._slot, self._put, self._put_rtt, _add
        touched: list[Bundle] = []
        records = 0
        for d in batch:
            records += 1
            f, c, s, svc = d.flow, d.client, d.server, d.service
            sname = svc.name if svc is not None else ""
            fk = (f.transport, f.family, f.server_port, sname)
            fl = flow_get(fk)
            if fl is None:
                fl = self._flow(fk)
            if by_peer is None:  # an end's ids depend on its address
                c_src, c_dst = self._end(c, f.client_ip)
                s_src, s_dst = self._end(s, f.server_ip)
            else:  # they depend on the peer only: look them up by identity (a cached entry holds
                hit = by_peer(id(c))  # its Peer: an equal id is the same object)
                c_src, c_dst = hit[1] if hit is not None else self._end_of(c)
                hit = by_peer(id(s))
                s_src, s_dst = hit[1] if hit is not None else self._end_of(s)
            k = (c_src, s_dst, fl)
            up = bundles_get(k) or bundle(k)
            k = (s_src, c_dst, fl)
            down = bundles_get(k) or bundle(k)
            interzone = c.zone and s.zone and c.zone != s.zone
            tcp = f.retransmits_c2s is not None and f.transport == "tcp"  # TCP health (eBPF source)
            # None: no counters (conntrack accounting off): no series. 0: the series exists, unchanged.
            # A negative value (no source gives one) goes straight to its series.
            if d.count_c2s:
                if not up[DIRTY]:
                    up[DIRTY] = True
                    touched.append(up)
                v = f.bytes_c2s
                if v is not None:
                    if up[0] is not None or not put(up, 0, now, v):
                        if v > 0:
                            up[10] += v
                        elif v:
                            add(up[0], v)
                    if v and interzone and (up[2] is not None or not put(up, 2, now, v)):
                        if v > 0:
                            up[12] += v
                        else:
                            add(up[2], v)
                v = f.packets_c2s
                if v is not None and (up[1] is not None or not put(up, 1, now, v)):
                    if v > 0:
                        up[11] += v
                    elif v:
                        add(up[1], v)
                if f.opened or f.closed:  # connections: where the client->server bytes are counted
                    ser = up[3] or slot(up, 3, now)
                    if f.opened:
                        ser.total += 1
                        ser.changed = True
                    ser = up[4] or slot(up, 4, now)
                    if f.closed:
                        ser.total += 1
                        ser.changed = True
                    ser = up[5] or slot(up, 5, now)
                    if f.opened != f.closed:
                        ser.total += 1 if f.opened else -1
                        ser.changed = True
                if tcp:  # retransmits and resets the client sent, the RTT its socket measured
                    v = f.retransmits_c2s
                    if (up[6] is not None or not put(up, 6, now, v)) and v:
                        if v > 0:
                            up[16] += v
                        else:
                            add(up[6], v)
                    v = f.resets_c2s
                    if (up[7] is not None or not put(up, 7, now, v)) and v:
                        if v > 0:
                            up[17] += v
                        else:
                            add(up[7], v)
                    v = f.rtt_us_c2s
                    if v is not None and (up[8] is not None or not put_rtt(up, now, v)):
                        up[RTTS].append(v)  # one observation
            if d.count_s2c:
                if not down[DIRTY]:
                    down[DIRTY] = True
                    touched.append(down)
                v = f.bytes_s2c
                if v is not None:
                    if down[0] is not None or not put(down, 0, now, v):
                        if v > 0:
                            down[10] += v
                        elif v:
                            add(down[0], v)
                    if v and interzone and (down[2] is not None or not put(down, 2, now, v)):
                        if v > 0:
                            down[12] += v
                        else:
                            add(down[2], v)
                v = f.packets_s2c
                if v is not None and (down[1] is not None or not put(down, 1, now, v)):
                    if v > 0:
                        down[11] += v
                    elif v:
                        add(down[1], v)
                if tcp:  # retransmits and resets the server sent, the RTT its socket measured
                    v = f.retransmits_s2c
                    if (down[6] is not None or not put(down, 6, now, v)) and v:
                        if v > 0:
                            down[16] += v
                        else:
                            add(down[6], v)
                    v = f.resets_s2c
                    if (down[7] is not None or not put(down, 7, now, v)) and v:
                        if v > 0:
                            down[17] += v
                        else:
                            add(down[7], v)
                    v = f.rtt_us_s2c
                    if v is not None and (down[8] is not None or not put_rtt(down, now, v)):
                        down[RTTS].append(v)
        self._fold(touched)
        self.stats.records += records

    def _fold(self, touched: list[Bundle]) -> None:
        """Move the bundles' pending values into their series (each pending slot's series exists)."""
        observe = self._observe
        for b in touched:
            b[DIRTY] = False
            v = b[10]
            if v:
                ser = b[0]
                ser.total += v
                ser.changed = True
                b[10] = 0
            v = b[11]
            if v:
                ser = b[1]
                ser.total += v
                ser.changed = True
                b[11] = 0
            v = b[12]
            if v:
                ser = b[2]
                ser.total += v
                ser.changed = True
                b[12] = 0
            v = b[16]
            if v:
                ser = b[6]
                ser.total += v
                ser.changed = True
                b[16] = 0
            v = b[17]
            if v:
                ser = b[7]
                ser.total += v
                ser.changed = True
                b[17] = 0
            v = b[RTTS]
            if v:
                observe(b[8], v)
                b[RTTS] = []

    def _observe(self, h: HistSeries, values: list[int]) -> None:
        """RTT observations (microseconds) into a histogram series."""
        lo, hi = min(values), max(values)
        if h.total != h.exported:  # else the first since the last export: min/max restart
            lo, hi = min(lo, h.lo_us), max(hi, h.hi_us)
        h.lo_us, h.hi_us = lo, hi
        counts, bounds = h.counts, self._rtt.bounds_us
        for v in values:
            counts[bisect_left(bounds, v)] += 1
        h.total += len(values)
        h.sum_us += sum(values)
        h.changed = True

    def _bundle(self, key: tuple[int, int, int]) -> Bundle:
        """A new bundle for ``key``."""
        b = self._bundles[key] = [None] * KEY + [key] + [0] * 8 + [[], False]
        return b

    def _slot(self, b: Bundle, i: int, now: int) -> Series:
        """The series of metric ``i`` (METRIC_NAMES order) for bundle ``b``'s key: the existing one,
        a new one, or the overflow series (never kept in the slot)."""
        ms = self._metric_list[i]
        key = b[KEY]
        s = ms.series.get(key)
        if s is None:
            s = self._series(ms, key, now)
            if s is ms.overflow:
                return s
        b[i] = s
        return s

    def _put(self, b: Bundle, i: int, now: int, v: int) -> bool:
        """Fill slot ``i`` of ``b``; True when the value went to the overflow series (counted there
        now: it has no pending sum). ``_slot``, written out (it runs once per new series)."""
        ms = self._metric_list[i]
        key = b[KEY]
        s = ms.series.get(key)
        if s is None:
            s = self._series(ms, key, now)
            if s is ms.overflow:
                if v:
                    s.total += v
                    s.changed = True
                return True
        b[i] = s
        return False

    def _put_rtt(self, b: Bundle, now: int, v: int) -> bool:
        """``_put`` for an RTT observation."""
        h = self._slot(b, 8, now)
        if b[8] is h:
            return False
        self._observe(cast(HistSeries, h), [v])
        return True

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
        bundles = self._bundles
        for i, ms in enumerate(self._metric_list):
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
                b = bundles.get(key)
                if b is not None:
                    b[i] = None
            if ms.overflow is not None:
                ms.overflow.exported = ms.overflow.total
                ms.overflow.changed = False
        self.stats.series = sum(len(ms.series) for ms in self.metrics.values())
        if len(bundles) > 2 * self._bundles_kept + 1024:  # drop empty bundles (amortized)
            kept = {k: b for k, b in bundles.items() if any(x is not None for x in b[:KEY])}
            if len(kept) < len(bundles):
                self._bundles = kept
            self._bundles_kept = len(kept)
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
        bundles: dict[tuple[int, int, int], Bundle] = {}
        for (a, b, c), bundle in self._bundles.items():
            if a in remap and b in remap and c in remap:  # else empty: every live key is in remap
                bundle[KEY] = key = (remap[a], remap[b], remap[c])
                bundles[key] = bundle
        self._bundles = bundles
        self._bundles_kept = len(bundles)


FLOW_ATTRIBUTE_NAMES = tuple(a.name for a in FLOW_ATTRIBUTES)
