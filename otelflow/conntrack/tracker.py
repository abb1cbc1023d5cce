"""Exact per-flow delta accounting over conntrack dumps and events (pure: no sockets).

Rules (each one closes a way in which a naive poller loses or doubles bytes):

* A flow instance is keyed by (zone, family, original tuple, conntrack id). A reused id with another
  tuple, or the same tuple under a new id, is another flow. The same id *and* tuple recreated is
  caught by a NEW event after its DESTROY (events arrive in order), or by counters going backwards.
  A NEW event for a flow that is still tracked is a late event (a deep queue can deliver it after
  a dump already showed the flow) and changes nothing.
* The first dump is a **baseline**: flows that existed before the agent started report only what
  they add afterwards (the agent did not see their past). Every flow that appears later reports all
  of its counters.
* Each report is "counters now minus counters last reported", so a flow's deltas sum to exactly
  its final counters minus its baseline, however the dumps and events interleave.
* DESTROY events carry the final counters: a flow that opens and closes between two polls still
  contributes exactly once. A destroyed flow leaves a tombstone for a few polls so that a dump
  snapshot read just before the destruction cannot resurrect it.
* A flow that vanishes from the table without a DESTROY (lost events) is closed and counted in
  ``stats.vanished`` (its bytes since the last dump are unknowable), and its memory is freed.
* ``closed`` is reported once per flow: when TCP reaches TIME_WAIT or CLOSE, or on DESTROY.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socket import inet_ntop
from typing import Protocol

from otelflow.conntrack.netlink import CtEntry, CtEvent
from otelflow.flow import FlowDelta, family_number, transport_name

# conntrack TCP states after which the connection is over (tcp_conntrack.h numbering)
_TCP_CLOSED_STATES = {"TIME_WAIT", "CLOSE"}
TOMBSTONE_POLLS = 3

Key = tuple[int, int, int, bytes, bytes, int, int, int]
Counters = tuple[int, int, int, int]  # orig packets, orig bytes, reply packets, reply bytes


def flow_key(e: CtEntry) -> Key:
    o = e.orig
    return (e.zone, e.family, o.proto, o.src, o.dst, o.sport, o.dport, e.id)


def _counters(e: CtEntry) -> Counters | None:
    if e.orig_bytes is None or e.reply_bytes is None:
        return None
    return (e.orig_packets or 0, e.orig_bytes, e.reply_packets or 0, e.reply_bytes)


class TrackerListener(Protocol):
    """Told when a flow instance starts and when it is gone (closed and removed, or vanished):
    the eBPF source keeps its tuple index of conntrack flows this way."""

    def started(self, fid: str, entry: CtEntry, first_seen: float) -> None: ...
    def ended(self, fid: str, entry: CtEntry) -> None: ...


@dataclass(slots=True)
class TrackerStats:
    flows: int = 0  # flows tracked now
    opened: int = 0  # flow instances started (after the baseline)
    closed: int = 0
    vanished: int = 0  # left the table without a DESTROY event: final bytes unknown
    counter_resets: int = 0  # counters went backwards: treated as a new flow
    stale_ignored: int = 0  # dump rows of already destroyed flows, NEW events of known flows
    no_counters: int = 0  # entries without counters (nf_conntrack_acct was off when they started)


@dataclass(slots=True)
class _Flow:
    fid: str
    entry: CtEntry  # latest view (tuples, state, status)
    last: Counters  # counters already reported
    first_seen: float
    last_seen: float
    seen_gen: int
    has_counters: bool
    pend: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # deltas not yet collected
    opened: bool = False
    closed: bool = False
    close_reported: bool = False
    dirty: bool = False


class FlowTracker:
    """Feed it dumps and events; ``collect()`` returns one FlowDelta per flow that changed."""

    def __init__(
        self,
        observer: str,
        source: str = "conntrack",
        clock: Callable[[], float] = time.time,
        listener: TrackerListener | None = None,
    ) -> None:
        self.observer = observer
        self.listener = listener
        self.source = source
        self.clock = clock
        self.stats = TrackerStats()
        self._flows: dict[Key, _Flow] = {}
        self._tombs: dict[Key, tuple[Counters | None, int]] = {}
        self._gen = 0  # dump generation
        self._baselined = False
        self._ids = itertools.count(1)
        self._finished: list[FlowDelta] = []  # records of flows already removed, awaiting collect

    # ---- input ---------------------------------------------------------------------------------
    def on_dump(self, entries: Iterable[CtEntry]) -> None:
        """A complete table dump. Call ``on_events`` with the events read right after it, then
        ``end_dump()`` so that flows missing from the table can be settled."""
        self._gen += 1
        now = self.clock()
        baseline = not self._baselined
        for e in entries:
            self._observe(e, now, baseline)
        self._baselined = True

    def on_events(self, events: Iterable[CtEvent]) -> None:
        now = self.clock()
        for ev in events:
            if ev.kind == "destroy":
                self._destroy(ev.entry, now)
            elif ev.kind == "new":
                self._new(ev.entry, now)

    def end_dump(self) -> None:
        """Settle flows the last dump did not contain and no DESTROY explained: they vanished."""
        gen = self._gen
        gone = [k for k, f in self._flows.items() if f.seen_gen != gen]
        for k in gone:
            f = self._flows.pop(k)
            self._ended(f)
            self.stats.vanished += 1
            self._close(f, self.clock())
            self._finished.append(self._record(f))
        for k in [k for k, (_, g) in self._tombs.items() if gen - g >= TOMBSTONE_POLLS]:
            del self._tombs[k]
        self.stats.flows = len(self._flows)

    # ---- output --------------------------------------------------------------------------------
    def collect(self) -> list[FlowDelta]:
        out = self._finished
        self._finished = []
        for f in self._flows.values():
            if f.dirty:
                out.append(self._record(f))
        return out

    # ---- internals -----------------------------------------------------------------------------
    def _start(self, key: Key, e: CtEntry, now: float, last: Counters, opened: bool) -> _Flow:
        f = _Flow(
            fid=f"{next(self._ids):x}",
            entry=e,
            last=last,
            first_seen=now,
            last_seen=now,
            seen_gen=self._gen,
            has_counters=_counters(e) is not None,
        )
        if opened:
            f.opened = f.dirty = True
            self.stats.opened += 1
        self._flows[key] = f
        if self.listener is not None:
            self.listener.started(f.fid, e, now)
        return f

    def _ended(self, f: _Flow) -> None:
        if self.listener is not None:
            self.listener.ended(f.fid, f.entry)

    def _add(self, f: _Flow, cur: Counters, now: float) -> None:
        f.has_counters = True
        d = [c - p for c, p in zip(cur, f.last, strict=True)]
        if any(d):
            for i in range(4):
                f.pend[i] += d[i]
            f.last = cur
            f.last_seen = now
            f.dirty = True

    def _close(self, f: _Flow, now: float) -> None:
        if not f.close_reported:
            f.closed = f.close_reported = f.dirty = True
            f.last_seen = now
            self.stats.closed += 1

    def _observe(self, e: CtEntry, now: float, baseline: bool) -> None:
        key = flow_key(e)
        cur = _counters(e)
        if cur is None:
            self.stats.no_counters += 1
        f = self._flows.get(key)
        if f is None:
            tomb = self._tombs.get(key)
            if tomb is not None:
                final = tomb[0]
                if cur is None or final is None or all(c <= p for c, p in zip(cur, final, strict=True)):
                    self.stats.stale_ignored += 1  # a snapshot from before its DESTROY
                    return
                del self._tombs[key]  # counters beyond the final ones: a new instance
            zero: Counters = (0, 0, 0, 0)
            f = self._start(key, e, now, (cur or zero) if baseline else zero, opened=not baseline)
        elif cur is not None and any(c < p for c, p in zip(cur, f.last, strict=True)):
            self.stats.counter_resets += 1
            self._close(f, now)
            self._ended(f)
            self._finished.append(self._record(f))
            f = self._start(key, e, now, (0, 0, 0, 0), opened=True)
        f.entry = e
        f.seen_gen = self._gen
        if cur is not None:
            self._add(f, cur, now)
        if e.tcp_state_name in _TCP_CLOSED_STATES:
            self._close(f, now)

    def _new(self, e: CtEntry, now: float) -> None:
        key = flow_key(e)
        if key in self._flows:  # late: a dump already showed this flow
            self.stats.stale_ignored += 1
            return
        self._tombs.pop(key, None)  # after its DESTROY: a new instance with the same id and tuple
        if self._baselined:
            f = self._start(key, e, now, (0, 0, 0, 0), opened=True)
            cur = _counters(e)
            if cur is not None:
                self._add(f, cur, now)

    def _destroy(self, e: CtEntry, now: float) -> None:
        key = flow_key(e)
        cur = _counters(e)
        f = self._flows.pop(key, None)
        if f is None:
            if key in self._tombs or not self._baselined:
                return
            # opened and closed between two dumps (and its NEW event was not seen)
            f = self._start(key, e, now, (0, 0, 0, 0), opened=True)
            del self._flows[key]
        f.entry = e
        self._ended(f)
        if cur is not None:
            if any(c < p for c, p in zip(cur, f.last, strict=True)):
                self.stats.counter_resets += 1
            else:
                self._add(f, cur, now)
        self._close(f, now)
        self._tombs[key] = (cur, self._gen)
        if f.dirty:  # nothing new (closed and counted already, e.g. at TIME_WAIT): no empty record
            self._finished.append(self._record(f))
        self.stats.flows = len(self._flows)

    def _record(self, f: _Flow) -> FlowDelta:
        has = f.has_counters
        rec = entry_delta(
            f.entry,
            f.fid,
            self.observer,
            self.source,
            (f.pend[1], f.pend[0], f.pend[3], f.pend[2]) if has else None,
            opened=f.opened,
            closed=f.closed,
            first_seen=f.first_seen,
            last_seen=f.last_seen,
        )
        f.pend = [0, 0, 0, 0]
        f.opened = f.closed = f.dirty = False
        return rec


def entry_delta(
    e: CtEntry,
    fid: str,
    observer: str,
    source: str,
    counters: tuple[int, int, int, int] | None,
    *,
    opened: bool,
    closed: bool,
    first_seen: float,
    last_seen: float,
) -> FlowDelta:
    """A flow delta named by a conntrack entry: the original tuple is client -> dialed, the reply
    tuple backend -> client as the backend saw it. ``counters`` = (bytes c2s, packets c2s,
    bytes s2c, packets s2c), or None when unknown."""
    o, r = e.orig, e.reply
    af = o.family
    b1, p1, b2, p2 = counters if counters is not None else (None, None, None, None)
    return FlowDelta(
        flow_id=fid,
        source=source,
        observer=observer,
        family=family_number(af),
        transport=transport_name(o.proto),
        client_ip=inet_ntop(af, o.src),
        client_port=o.sport,
        dialed_ip=inet_ntop(af, o.dst),
        dialed_port=o.dport,
        server_ip=inet_ntop(af, r.src),
        server_port=r.sport,
        client_nat_ip=inet_ntop(af, r.dst),
        client_nat_port=r.dport,
        dnat=e.dnat,
        snat=e.snat,
        bytes_c2s=b1,
        packets_c2s=p1,
        bytes_s2c=b2,
        packets_s2c=p2,
        opened=opened,
        closed=closed,
        state=e.tcp_state_name,
        first_seen=first_seen,
        last_seen=last_seen,
        ct_id=e.id,
        zone=e.zone,
        mark=e.mark,
    )
