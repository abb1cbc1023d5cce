"""Delta accounting rules of the conntrack tracker, on synthetic entries (no kernel)."""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from otelflow.conntrack.netlink import IPS_DST_NAT, IPS_SRC_NAT, CtEntry, CtEvent, CtTuple
from otelflow.conntrack.tracker import TOMBSTONE_POLLS, FlowTracker
from otelflow.flow import FlowDelta

ESTABLISHED, TIME_WAIT = 3, 7  # tcp_conntrack.h numbering


def ip(s: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in s else socket.AF_INET, s)


def entry(
    counters: tuple[int, int, int, int] | None = (1, 100, 1, 200),
    *,
    cid: int = 7,
    sport: int = 40000,
    state: int | None = ESTABLISHED,
    client: str = "10.244.1.2",
    dialed: str = "10.96.0.10",
    server: str = "10.244.2.3",
    status: int = IPS_DST_NAT,
) -> CtEntry:
    fam = socket.AF_INET6 if ":" in client else socket.AF_INET
    e = CtEntry(
        family=fam,
        orig=CtTuple(ip(client), ip(dialed), 6, sport, 80),
        reply=CtTuple(ip(server), ip(client), 6, 8080, sport),
        id=cid,
        status=status,
        tcp_state=state,
    )
    if counters is not None:
        e.orig_packets, e.orig_bytes, e.reply_packets, e.reply_bytes = counters
    return e


def poll(t: FlowTracker, entries: list[CtEntry], events: list[CtEvent] = ()) -> list[FlowDelta]:  # type: ignore[assignment]
    t.on_dump(entries)
    t.on_events(events)
    t.end_dump()
    return t.collect()


def sums(recs: list[FlowDelta]) -> tuple[int, int, int, int]:
    return (
        sum(r.packets_c2s or 0 for r in recs),
        sum(r.bytes_c2s or 0 for r in recs),
        sum(r.packets_s2c or 0 for r in recs),
        sum(r.bytes_s2c or 0 for r in recs),
    )


def test_baseline_reports_nothing_then_only_growth() -> None:
    t = FlowTracker("n1")
    assert poll(t, [entry((5, 500, 5, 900))]) == []
    [r] = poll(t, [entry((7, 700, 6, 1000))])
    assert (r.packets_c2s, r.bytes_c2s, r.packets_s2c, r.bytes_s2c) == (2, 200, 1, 100)
    assert not r.opened and not r.closed
    assert poll(t, [entry((7, 700, 6, 1000))]) == []  # no change, no record


def test_new_flow_reports_everything_and_roles_see_through_nat() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    [r] = poll(t, [entry((3, 300, 2, 400))])
    assert r.opened and (r.bytes_c2s, r.bytes_s2c) == (300, 400)
    assert (r.client_ip, r.client_port) == ("10.244.1.2", 40000)
    assert (r.dialed_ip, r.dialed_port) == ("10.96.0.10", 80)  # what the client addressed
    assert (r.server_ip, r.server_port) == ("10.244.2.3", 8080)  # the backend that answered
    assert r.dnat and not r.snat and r.transport == "tcp" and r.family == 4 and r.observer == "n1"


def test_masquerade_keeps_the_client_as_the_server_saw_it() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    e = entry(dialed="203.0.113.10", server="203.0.113.10", status=IPS_SRC_NAT)
    e.reply = CtTuple(ip("203.0.113.10"), ip("10.100.0.11"), 6, 80, 40000)
    [r] = poll(t, [e])
    assert r.snat and r.server_ip == r.dialed_ip == "203.0.113.10" and r.client_nat_ip == "10.100.0.11"


def test_flow_opened_and_destroyed_between_polls_counts_once() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    t.on_events([CtEvent("new", entry(None)), CtEvent("destroy", entry((4, 400, 3, 300), state=None))])
    recs = poll(t, [])
    assert sums(recs) == (4, 400, 3, 300)
    assert sum(r.opened for r in recs) == 1 and sum(r.closed for r in recs) == 1
    assert t.stats.flows == 0  # memory freed


def test_destroy_without_a_seen_new_still_counts_once() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    recs = poll(t, [], [CtEvent("destroy", entry((2, 20, 2, 40), state=None))])
    assert sums(recs) == (2, 20, 2, 40) and recs[0].opened and recs[0].closed


def test_destroy_after_dumps_adds_only_the_rest_and_stale_rows_are_ignored() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    a = poll(t, [entry((1, 100, 1, 100))])
    b = poll(t, [entry((2, 200, 2, 200))], [CtEvent("destroy", entry((3, 300, 3, 300), state=None))])
    # a dump snapshot taken before the DESTROY must not bring the flow back
    c = poll(t, [entry((2, 200, 2, 200))])
    assert c == [] and t.stats.stale_ignored == 1
    assert sums(a + b) == (3, 300, 3, 300)
    assert sum(r.closed for r in a + b) == 1


def test_tombstones_expire() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    poll(t, [], [CtEvent("destroy", entry((1, 1, 1, 1)))])
    for _ in range(TOMBSTONE_POLLS):
        poll(t, [])
    assert not t._tombs


def test_same_id_and_tuple_recreated_is_a_new_instance() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    first = poll(t, [entry((5, 500, 5, 500))])
    second = poll(t, [entry((1, 60, 1, 60))], [])  # counters went backwards: a new instance too
    assert t.stats.counter_resets == 1
    assert sums(first) == (5, 500, 5, 500) and sums(second) == (1, 60, 1, 60)
    ids = {r.flow_id for r in first + second}
    assert len(ids) == 2
    # DESTROY, then NEW with the same id and tuple (events arrive in order): a third instance
    t.on_events([CtEvent("destroy", entry((1, 60, 1, 60), state=None)), CtEvent("new", entry(None))])
    third = poll(t, [entry((2, 70, 1, 10))])
    assert sums(third) == (2, 70, 1, 10)
    assert len({r.flow_id for r in first + second + third}) == 3


def test_late_new_event_of_a_known_flow_changes_nothing() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    a = poll(t, [entry((2, 200, 2, 200))])
    b = poll(t, [entry((3, 300, 2, 200))], [CtEvent("new", entry(None))])  # queued before the dump
    assert sums(a + b) == (3, 300, 2, 200) and len({r.flow_id for r in a + b}) == 1
    assert t.stats.stale_ignored == 1


def test_reused_id_with_another_tuple_is_another_flow() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    recs = poll(t, [entry((1, 10, 1, 10), sport=1), entry((2, 20, 2, 20), sport=2)])
    assert len({r.flow_id for r in recs}) == 2


def test_vanished_flow_is_closed_counted_and_freed() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    poll(t, [entry((1, 10, 1, 10))])
    [r] = poll(t, [])
    assert r.closed and t.stats.vanished == 1 and t.stats.flows == 0


def test_time_wait_closes_once() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    a = poll(t, [entry((5, 500, 4, 400), state=TIME_WAIT)])
    b = poll(t, [entry((6, 552, 4, 400), state=TIME_WAIT)])  # a late ACK
    c = poll(t, [], [CtEvent("destroy", entry((6, 552, 4, 400), state=None))])
    assert sum(r.closed for r in a + b + c) == 1
    assert sums(a + b + c) == (6, 552, 4, 400)
    # the DESTROY (up to 120 s after TIME_WAIT) adds nothing new: no empty record that would be
    # decorated minutes after the flow, when its addresses may have other owners
    assert c == []


def test_accounting_off_counts_connections_without_bytes() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    [r] = poll(t, [entry(None)])
    assert r.opened and r.bytes_c2s is None and r.packets_s2c is None
    [r] = poll(t, [], [CtEvent("destroy", entry(None))])
    assert r.closed and r.bytes_c2s is None
    assert t.stats.no_counters == 1


def test_ipv6() -> None:
    t = FlowTracker("n1")
    poll(t, [])
    [r] = poll(t, [entry(client="fd00:244:0:1::2", dialed="fd00:96::10", server="fd00:244:0:2::3")])
    assert r.family == 6 and r.server_ip == "fd00:244:0:2::3"


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2000), st.integers(0, 2000)), max_size=12),
    destroy=st.booleans(),
    dup_destroy=st.booleans(),
    stale=st.booleans(),
)
def test_deltas_always_sum_to_the_final_counters(
    steps: list[tuple[int, int, int]], destroy: bool, dup_destroy: bool, stale: bool
) -> None:
    """Whatever the interleaving of dumps and events, a flow born after the baseline reports
    exactly its final counters, once."""
    t = FlowTracker("n1")
    poll(t, [])
    c = [0, 0, 0, 0]
    out: list[FlowDelta] = []
    t.on_events([CtEvent("new", entry(None))])
    for kind, b1, b2 in steps:
        c = [c[0] + 1, c[1] + b1, c[2] + 1, c[3] + b2]
        if kind == 0:
            out += poll(t, [entry(tuple(c))])  # type: ignore[arg-type]
        elif kind == 1:
            t.on_events([])  # idle event read
        else:
            out += poll(t, [entry(tuple(c))])  # type: ignore[arg-type]
            out += t.collect()
    final = tuple(c)
    if destroy:
        evs = [CtEvent("destroy", entry(final, state=None))]  # type: ignore[arg-type]
        if dup_destroy:
            evs.append(evs[0])
        out += poll(t, [entry(final)] if stale else [], evs)  # type: ignore[arg-type]
    else:
        out += poll(t, [entry(final)])  # type: ignore[arg-type]
    assert sums(out) == final
    assert sum(r.opened for r in out) == 1
    assert sum(r.closed for r in out) == (1 if destroy else 0)
