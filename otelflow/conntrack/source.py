"""The conntrack flow source: dumps plus NEW/DESTROY events in the agent's network namespace.

Per poll: read pending events, dump the table (never the zero-counters dump: other tools on the node
read the same counters), read the events the dump itself caused (a dump that walks over an expired
entry destroys it on the spot), settle vanished flows, and return the flow deltas.

The event socket is opened before the first (baseline) dump: with the kernel default
``nf_conntrack_events=2`` an entry gets events when a listener exists as it is created, so every
flow that starts after the baseline has its DESTROY with final counters. (Older entries may or may
not report theirs; both cases are handled.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from otelflow.config import ConntrackConfig
from otelflow.conntrack import netlink as nl
from otelflow.conntrack.tracker import FlowTracker, TrackerListener
from otelflow.flow import FlowDelta

log = logging.getLogger(__name__)

ACCT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_acct"
MAX_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_max"
COUNT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_count"
ACCT_REMEDY = (
    "run 'sysctl -w net.netfilter.nf_conntrack_acct=1' on the node, or set "
    "source.conntrack.enable_acct: true (the agent then needs CAP_NET_ADMIN and a writable /proc/sys); "
    "entries created before that never get counters"
)


class ConntrackUnavailable(RuntimeError):
    """conntrack cannot be read here; the message says why and what to do."""


def read_sysctl(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def accounting_enabled() -> bool | None:
    """nf_conntrack_acct in this namespace: True, False, or None when conntrack is absent."""
    v = read_sysctl(ACCT_SYSCTL)
    return None if v is None else v == "1"


def table_fill() -> tuple[int, int] | None:
    """(entries, maximum) of this namespace's conntrack table, or None when unreadable."""
    c, m = read_sysctl(COUNT_SYSCTL), read_sysctl(MAX_SYSCTL)
    if c is None or m is None:
        return None
    return int(c), int(m)


@dataclass(slots=True)
class SourceStats:
    polls: int = 0
    dumped_entries: int = 0  # entries read by the last dump
    dump_errors: int = 0
    event_overflows: int = 0  # ENOBUFS on the event socket (events lost, resynchronised by a dump)
    events: int = 0
    parse_malformed: int = 0  # malformed netlink messages skipped
    table_entries: int = 0
    table_max: int = 0


class ConntrackSource:
    """A flow source over this namespace's conntrack table."""

    name = "conntrack"

    def __init__(
        self,
        cfg: ConntrackConfig,
        observer: str,
        *,
        need_counters: bool = True,
        listener: TrackerListener | None = None,
    ) -> None:
        self.cfg = cfg
        # False when another source counts the bytes (eBPF) and conntrack only names flows and NAT
        self.need_counters = need_counters
        self.tracker = FlowTracker(observer, source=self.name, listener=listener)
        self.stats = SourceStats()
        self.accounting = False
        self._events: nl.EventSocket | None = None
        self._parse = nl.ParseStats()
        self._layouts = nl.LayoutCache()  # learned message layouts: later dumps take the fast path
        self._resync = False

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        acct = accounting_enabled()
        if acct is None:
            raise ConntrackUnavailable(
                "conntrack is not available in this network namespace (no net.netfilter.nf_conntrack_acct): "
                "the kernel needs nf_conntrack, and a rule set that uses it (kube-proxy's does)"
            )
        if not self.need_counters:
            pass
        elif not acct and self.cfg.enable_acct:
            try:
                with open(ACCT_SYSCTL, "w", encoding="ascii") as f:
                    f.write("1\n")
                acct = True
                log.warning("conntrack accounting was off; turned it on (source.conntrack.enable_acct)")
            except OSError as e:
                log.warning(
                    "conntrack accounting is off and could not be turned on: %s; %s", e.strerror, ACCT_REMEDY
                )
        elif not acct:
            log.warning(
                "conntrack accounting is off (net.netfilter.nf_conntrack_acct=0): connections are counted, "
                "bytes and packets are not; %s",
                ACCT_REMEDY,
            )
        self.accounting = bool(acct)
        try:
            self._events = nl.EventSocket(rcvbuf=self.cfg.event_buffer_bytes)
        except OSError as e:
            raise ConntrackUnavailable(
                f"cannot subscribe to conntrack events: {e.strerror or e}; the agent needs CAP_NET_ADMIN"
            ) from None
        self._sync()  # the baseline: it reports nothing itself
        self.tracker.collect()

    def fileno(self) -> int | None:
        return self._events.fileno() if self._events else None

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None

    # ---- work ----------------------------------------------------------------------------------
    def on_readable(self) -> None:
        """Drain pending events now (call when fileno() is readable) so the socket never overflows;
        after an overflow, resynchronise from a dump at once."""
        self.tracker.on_events(self._read_events())
        if self._resync:
            self._sync()

    def poll(self, final: bool = False) -> list[FlowDelta]:
        self.stats.polls += 1
        self.tracker.on_events(self._read_events())
        self._sync()
        return self.tracker.collect()

    def _sync(self) -> None:
        """Dump, apply the events the dump caused, settle vanished flows; deltas wait for collect."""
        self._resync = False
        self.tracker.on_dump(self._dump())
        self.tracker.on_events(self._read_events())
        self.tracker.end_dump()
        fill = table_fill()
        if fill:
            self.stats.table_entries, self.stats.table_max = fill
            if fill[1] and fill[0] >= 0.95 * fill[1]:
                pct = 100 * fill[0] // fill[1]
                log.warning(
                    "conntrack table is %d%% full (%d of %d): new connections may be dropped", pct, *fill
                )

    def _dump(self) -> list[nl.CtEntry]:
        try:
            entries = nl.dump(stats=self._parse, cache=self._layouts)
        except OSError as e:
            self.stats.dump_errors += 1
            raise ConntrackUnavailable(f"conntrack dump failed: {e}") from None
        self.stats.dumped_entries = len(entries)
        self.stats.parse_malformed = self._parse.malformed
        return entries

    def _read_events(self) -> list[nl.CtEvent]:
        ev = self._events
        if ev is None:
            return []
        out: list[nl.CtEvent] = []
        while True:
            overflows = ev.overflows
            batch = ev.read_events()
            out += batch
            # after ENOBUFS the queue still holds older events: drain them before any resync dump
            if not batch and ev.overflows == overflows:
                break
        self.stats.events += len(out)
        if ev.needs_resync:
            # events were lost: the next dump resynchronises (lost DESTROYs show up as vanished flows)
            self.stats.event_overflows = ev.overflows
            ev.needs_resync = False
            self._resync = True
            log.warning(
                "conntrack event socket overflowed (%d times): resynchronising from a dump", ev.overflows
            )
        return out
