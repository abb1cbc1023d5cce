"""The aggregator against a straightforward re-implementation of its counting rules: per record and
direction, per metric, a key's series is made on first use, or, once the metric holds max_series,
the value goes to the overflow series and one overflow point is counted. Random records (None, 0 and
negative counters, TCP health with and without RTT samples, count-once on either side, several
batches and intervals) at workload level with a small cap, so the overflow path is exercised."""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import defaultdict

from otelflow.aggregate import OVERFLOW_KEY, Aggregator, HistSeries
from otelflow.decorate import DecoratedFlow
from otelflow.flow import FlowDelta
from otelflow.meta.model import Peer, ServiceMeta
from otelflow.schema import RTT_BOUNDS_S

BOUNDS_US = [round(b * 1e6) for b in RTT_BOUNDS_S]
Key = tuple[str, str, int, str]  # (source workload, destination workload, server port, Service)


class Reference:
    """Totals per metric and key, the overflow totals, the overflow point count, RTT histograms."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.totals: dict[str, dict[Key, int]] = defaultdict(dict)
        self.overflow: dict[str, int] = defaultdict(int)
        self.points = 0
        self.rtt: dict[Key | None, list[int]] = defaultdict(list)  # None: the overflow series

    def touch(self, metric: str, key: Key, value: int) -> Key | None:
        series = self.totals[metric]
        if key not in series:
            if len(series) >= self.cap:
                self.points += 1
                self.overflow[metric] += value
                return None
            series[key] = 0
        series[key] += value
        return key

    def record(self, d: DecoratedFlow) -> None:
        f, c, s = d.flow, d.client, d.server
        cw, sw, port = c.workload_name, s.workload_name, f.server_port  # Service: named after sw
        tcp = f.retransmits_c2s is not None
        for c2s, own, key, nbytes, npackets, retrans, resets, rtt in (
            (True, d.count_c2s, (cw, sw, port, sw), f.bytes_c2s, f.packets_c2s,
             f.retransmits_c2s, f.resets_c2s, f.rtt_us_c2s),
            (False, d.count_s2c, (sw, cw, port, sw), f.bytes_s2c, f.packets_s2c,
             f.retransmits_s2c, f.resets_s2c, f.rtt_us_s2c),
        ):  # fmt: skip
            if not own:
                continue
            if nbytes is not None:
                self.touch("otelflow.flow.bytes", key, nbytes)
                if nbytes and c.zone != s.zone:
                    self.touch("otelflow.flow.interzone.bytes", key, nbytes)
            if npackets is not None:
                self.touch("otelflow.flow.packets", key, npackets)
            if c2s and (f.opened or f.closed):  # connections: where the client->server bytes are
                self.touch("otelflow.connections.opened", key, int(f.opened))
                self.touch("otelflow.connections.closed", key, int(f.closed))
                self.touch("otelflow.connections.active", key, int(f.opened) - int(f.closed))
            if tcp:
                self.touch("otelflow.tcp.retransmits", key, retrans or 0)
                self.touch("otelflow.tcp.resets", key, resets or 0)
                if rtt is not None:
                    self.rtt[self.touch("otelflow.tcp.rtt", key, 1)].append(rtt)


def records(r: random.Random, n: int) -> list[DecoratedFlow]:
    peers = [
        Peer("pod", "pod", node=f"n{i % 2}", zone=f"z{i % 3}", region="r", namespace="ns", name=f"w{i}-0",
             uid=f"u{i}", workload_name=f"w{i}", workload_kind="Deployment")
        for i in range(6)
    ]  # fmt: skip

    def counter() -> int | None:
        return r.choice([None, 0, 0, -3, r.randint(1, 10**12)])

    out = []
    for i in range(n):
        c, s = r.choice(peers), r.choice(peers)
        health = r.random() < 0.7
        f = FlowDelta(
            flow_id=str(i), source="ebpf", observer="n0", family=4, transport="tcp", client_ip="10.0.0.1",
            client_port=40000, dialed_ip="10.96.0.1", dialed_port=80, server_ip="10.0.0.2",
            server_port=r.choice([80, 5432]), client_nat_ip="10.0.0.1", client_nat_port=40000, dnat=True,
            snat=False, bytes_c2s=counter(), packets_c2s=counter(), bytes_s2c=counter(),
            packets_s2c=counter(),
            opened=r.random() < 0.3, closed=r.random() < 0.3, state="ESTABLISHED", first_seen=1.0,
            last_seen=2.0,
        )  # fmt: skip
        if health:
            f.retransmits_c2s, f.retransmits_s2c = r.choice([0, 0, 4]), r.choice([None, 0, 2])
            f.resets_c2s, f.resets_s2c = r.choice([None, 0, 1]), r.choice([0, 1])
            f.rtt_us_c2s = r.choice([None, r.randint(1, 10**7)])
            f.rtt_us_s2c = r.choice([None, r.randint(1, 10**7)])
        svc = ServiceMeta("ns", s.workload_name, ())
        out.append(DecoratedFlow(f, c, s, svc, r.random() < 0.8, r.random() < 0.8))
    return out


def test_counts_equal_the_reference_with_overflow() -> None:
    r = random.Random(11)  # 6 workloads, 2 ports: up to 144 keys per metric, 20 fit
    agg = Aggregator(level="workload", max_series=20)
    ref = Reference(cap=20)
    for _ in range(3):  # intervals
        for _ in range(4):  # polls
            batch = records(r, 150)
            agg.add(batch)
            for d in batch:
                ref.record(d)
        snap = agg.snapshot()
        for name, series in snap.items():
            got: dict[Key, int] = {}
            overflow = 0
            for s in series:
                pairs = dict(agg.pairs(s))
                if OVERFLOW_KEY in pairs:
                    overflow = s.total
                    continue
                key = (
                    str(pairs["source.k8s.workload.name"]),
                    str(pairs["destination.k8s.workload.name"]),
                    int(pairs["server.port"]),
                    str(pairs["k8s.service.name"]),
                )
                assert key not in got
                got[key] = s.total
            assert got == ref.totals[name], name
            assert overflow == ref.overflow[name], name
        for s in snap["otelflow.tcp.rtt"]:
            assert isinstance(s, HistSeries)
            pairs = dict(agg.pairs(s))
            key = None if OVERFLOW_KEY in pairs else (
                str(pairs["source.k8s.workload.name"]),
                str(pairs["destination.k8s.workload.name"]),
                int(pairs["server.port"]),
                str(pairs["k8s.service.name"]),
            )  # fmt: skip
            obs = ref.rtt[key]
            counts = [0] * (len(BOUNDS_US) + 1)
            for v in obs:
                counts[bisect_left(BOUNDS_US, v)] += 1
            assert (s.total, s.sum_us, s.counts) == (len(obs), sum(obs), counts)
            assert s.lifetime_min_max() == (min(obs), max(obs))
        assert agg.stats.overflow_points == ref.points
        agg.end_interval()
    assert ref.points > 0 and len(ref.totals["otelflow.tcp.rtt"]) == 20  # the cap was reached
