"""Lost TCP health events are never silent: the eBPF source counts them by reason and feature,
/metrics renders otelflow_agent_ebpf_health_lost_events_total (every reason x feature, exact), and
health whose flow has no delta in a poll waits for the flow's next delta instead of vanishing.

The source's joining runs here without a kernel: EbpfSource's constructor loads nothing, and the
conntrack index is fed as the conntrack tracker feeds it (tests/kernel covers the real datapath)."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

import pytest

from otelflow.agent import make_export
from otelflow.config import Config, SourceConfig
from otelflow.ebpf.health import SocketHealth
from otelflow.ebpf.join import Count
from otelflow.ebpf.source import EbpfSource
from otelflow.schema import HEALTH_FEATURES, HEALTH_LOSS_REASONS
from otelflow.selfmetrics import SelfMetrics
from tests.unit.test_ebpf_join import SVC, a

NAME = "otelflow_agent_ebpf_health_lost_events_total"


def lost_lines(src: object) -> list[str]:
    text = SelfMetrics(src, make_export(Config(), []), lambda: 0).render()
    return [ln for ln in text.splitlines() if ln.startswith(NAME)]


def line(reason: str, feature: str, n: int) -> str:
    return f'{NAME}{{reason="{reason}",feature="{feature}"}} {n}'


def test_every_reason_and_feature_is_rendered_zero_without_ebpf() -> None:
    src = SimpleNamespace(name="conntrack", stats=None)
    assert lost_lines(src) == [line(r, f, 0) for r in HEALTH_LOSS_REASONS for f in HEALTH_FEATURES]
    assert len(lost_lines(src)) == 12


def test_drops_and_kernel_skips_are_counted_per_feature(caplog: pytest.LogCaptureFixture) -> None:
    src = EbpfSource(SourceConfig(), "n1")
    drops = {
        "retrans_segs": 3,
        "retrans_failed": 1,
        "resets_sent": 0,
        "resets_received": 2,
        "rtt_samples": 7,
        "opened": 1,
        "closed": 1,
        "failed": 0,
    }
    with caplog.at_level(logging.WARNING, logger="otelflow.ebpf.source"):
        src._count_health_loss(drops, {"retransmits": 5, "rtt": 0, "resets": 0, "state": 2})
        src._count_health_loss(dict.fromkeys(drops, 0) | {"retrans_segs": 1}, {"retransmits": 1})
        src._warn_health_loss(final=False)
        src._warn_health_loss(final=False)  # nothing new: no second warning
    want = {
        ("map_full", "retransmits"): 5,
        ("map_full", "rtt"): 7,
        ("map_full", "resets"): 2,
        ("map_full", "state"): 2,
        ("kernel_skipped", "retransmits"): 6,
        ("kernel_skipped", "state"): 2,
    }
    assert lost_lines(src) == [
        line(r, f, want.get((r, f), 0)) for r in HEALTH_LOSS_REASONS for f in HEALTH_FEATURES
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "TCP health: 24 event(s) lost since the last warning (in all: map_full: retransmits=5, rtt=7, "
        "resets=2, state=2; kernel_skipped: retransmits=6, state=2); see " + NAME
    ]
    # rate-limited: a new loss within the minute is counted at once, warned about later (or at exit)
    with caplog.at_level(logging.WARNING, logger="otelflow.ebpf.source"):
        src._count_health_loss({"rtt_samples": 1}, {})
        src._warn_health_loss(final=False)
        assert len(caplog.records) == 1
        src._warn_health_loss(final=True)
        assert len(caplog.records) == 2
    assert line("map_full", "rtt", 8) in lost_lines(src)


# SVC: pod 10.0.0.2:40000 -> ClusterIP 10.96.0.10:80, DNAT to backend 10.0.1.5:8080
C2S_KEY = (6, a("10.0.0.2"), a("10.96.0.10"), 40000, 80)  # as the client's pod sends it


def client_health(retrans: int) -> SocketHealth:
    """The client socket's record (it sees the ClusterIP as its peer), 16-byte v4-mapped addresses."""
    v4m = bytes(10) + b"\xff\xff"
    laddr, raddr = v4m + socket.inet_aton("10.0.0.2"), v4m + socket.inet_aton("10.96.0.10")
    return SocketHealth(laddr, raddr, 4026531840, 40000, 80, 4, retrans, *([0] * 12))


def poll(src: EbpfSource, nbytes: int, retrans: int, final: bool = False) -> list:
    counts = [Count(C2S_KEY, 4, 1, nbytes, 100.0, 100.1, 0x10)] if nbytes else []
    out = src._join(counts, [], [], final)
    src._add_health(out, [client_health(retrans)] if retrans else [], final)
    src.index.end_poll()
    return out


def test_health_before_its_packet_waits_for_the_flows_next_delta() -> None:
    src = EbpfSource(SourceConfig(), "n1")
    src.index.started("c1", SVC, 100.0)
    [d] = poll(src, 1000, 0)
    assert (d.flow_id, d.bytes_c2s, d.retransmits_c2s) == ("c1", 1000, 0)
    # the tracepoint saw 2 retransmissions whose packets the flow map has not drained yet
    assert poll(src, 0, 2) == []
    assert src.stats.health_carried == 1
    [d] = poll(src, 1400, 0)
    assert (d.flow_id, d.bytes_c2s, d.retransmits_c2s, d.retransmits_s2c) == ("c1", 1400, 2, 0)
    [d] = poll(src, 100, 1)  # carried ones are not counted twice; new ones add
    assert (d.retransmits_c2s, src.stats.health_carried) == (1, 1)
    assert lost_lines(src) == [line(r, f, 0) for r in HEALTH_LOSS_REASONS for f in HEALTH_FEATURES]


def test_health_whose_flow_is_gone_is_counted_lost() -> None:
    src = EbpfSource(SourceConfig(), "n1")
    src.index.started("c1", SVC, 100.0)
    poll(src, 1000, 0)
    assert poll(src, 0, 3) == []  # carried
    src.index.ended("c1", SVC)
    for _ in range(3):  # the index keeps the flow's keys for its grace polls: still carried
        assert poll(src, 0, 0) == []
        assert src.stats.health_lost["unjoined"]["retransmits"] == 0
    assert poll(src, 0, 0) == []  # then forgets them: the carried events are lost
    assert src.stats.health_lost["unjoined"] == {"retransmits": 3, "rtt": 0, "resets": 0, "state": 0}
    assert line("unjoined", "retransmits", 3) in lost_lines(src)


def test_health_without_a_delta_at_the_final_poll_is_counted_lost() -> None:
    src = EbpfSource(SourceConfig(), "n1")
    src.index.started("c1", SVC, 100.0)
    poll(src, 1000, 0)
    assert poll(src, 0, 4, final=True) == []
    assert src.stats.health_lost["unjoined"]["retransmits"] == 4


def test_health_of_a_flow_not_known_yet_is_retried_at_the_next_poll() -> None:
    src = EbpfSource(SourceConfig(), "n1")
    assert poll(src, 0, 5) == []  # conntrack's event for the flow not read yet: nobody claims it
    src.index.started("c1", SVC, 100.0)
    [d] = poll(src, 1000, 1)
    assert (d.flow_id, d.bytes_c2s, d.retransmits_c2s) == ("c1", 1000, 6)
    [d] = poll(src, 1000, 0)  # retried once, not again
    assert d.retransmits_c2s == 0


def test_a_socket_of_no_flow_is_dropped_after_one_retry_and_not_counted_lost() -> None:
    src = EbpfSource(SourceConfig(), "n1")
    assert poll(src, 0, 5) == []
    assert poll(src, 0, 0) == []  # retried: still nobody's (a socket of a flow another node counts)
    src.index.started("c1", SVC, 100.0)
    [d] = poll(src, 1000, 0)
    assert d.retransmits_c2s == 0
    assert lost_lines(src) == [line(r, f, 0) for r in HEALTH_LOSS_REASONS for f in HEALTH_FEATURES]
