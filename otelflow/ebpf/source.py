"""The eBPF flow source: TC counters on the node's interfaces, joined into flows through conntrack.

    start   load flow.bpf.o; watch links (rtnetlink); attach to every candidate interface; cover
            the bridges whose ports are all attached; start conntrack (names and NAT only)
    poll    drain the flow map (swap, batch read), read conntrack, join the one-way counts into
            flows (otelflow.ebpf.join), return FlowDeltas like the conntrack source's
    close   detach everything we attached (also run on SIGTERM/SIGINT through the agent's stop)

Where it attaches (one node = one network namespace): the TC ingress and egress hooks (tcx links
first in the chain where the kernel has tcx, else cls_bpf on clsact: ``source.ebpf.attach``, see
loader.py) of every Ethernet interface that is not a bridge (the host side of each pod veth, and
the uplinks), filtered by ``source.ebpf.interfaces``/``exclude_interfaces``; bridges are "covered"
when every port is attached.
The programs count a packet at the first attached ingress it crosses, or at egress when it was
generated on the node (host-network pods, node processes) or entered through an unwatched
interface, so every packet the node handles is counted exactly once per node, with the addresses it
had before this node's NAT. Which node *reports* each direction (the sender's node, or the
receiver's when the sender is outside the cluster) is decided later, by count-once, exactly as for
the conntrack source. Interfaces that appear later (new pods) are attached as rtnetlink announces
them; gone ones are forgotten.

conntrack here only names flows: the tracker runs without needing nf_conntrack_acct (bytes come
from eBPF). Without conntrack the source still counts every byte, but cannot see through NAT: a
Service conversation then shows as client -> ClusterIP and backend -> client (logged once, counted
in ``stats.unmatched``).
"""

from __future__ import annotations

import fnmatch
import logging
import select
import socket
import time
from dataclasses import dataclass, field

from otelflow.config import SourceConfig
from otelflow.conntrack.source import ConntrackSource, ConntrackUnavailable
from otelflow.conntrack.tracker import FlowTracker, entry_delta
from otelflow.ebpf.health import SocketHealth, TcpHealth
from otelflow.ebpf.join import C2S, ConntrackIndex, Count, DirKey, LoneFlows, id_source, one_way_key
from otelflow.ebpf.links import Link, LinkWatcher
from otelflow.ebpf.loader import EbpfError, FlowCount, FlowCounter, mono_to_unix_ns
from otelflow.flow import FlowDelta
from otelflow.schema import HEALTH_FEATURES, HEALTH_LOSS_REASONS

log = logging.getLogger(__name__)

# health.DROP_NAMES (events not recorded: socket map full) -> the feature they belong to
DROP_FEATURE = {
    "retrans_segs": "retransmits",
    "retrans_failed": "retransmits",
    "resets_sent": "resets",
    "resets_received": "resets",
    "rtt_samples": "rtt",
    "opened": "state",
    "closed": "state",
    "failed": "state",
}
LOSS_WARN_EVERY = 60.0  # seconds between two warnings about lost health events


@dataclass(slots=True)
class EbpfStats:
    polls: int = 0
    interfaces: int = 0  # interfaces with our programs attached now
    covered: int = 0  # bridges covered now
    attach_mode: str = ""  # TC attach backend in use: "tcx" | "tc"
    attach_errors: int = 0  # attach attempts that failed (the interface is then not counted)
    link_events: int = 0
    map_capacity: int = 0  # entries one flow map holds (per interval)
    map_entries: int = 0  # entries the last drain read
    dropped_packets: int = 0  # packets not counted: flow map full or insert failed
    dropped_bytes: int = 0
    dropped_map_full_packets: int = 0
    dropped_map_full_bytes: int = 0
    counts: int = 0  # one-way counts drained
    matched: int = 0  # ... named by conntrack (NAT seen through)
    unmatched: int = 0  # ... conntrack did not know (paired by mirroring; no NAT view)
    lone_flows: int = 0  # flows tracked without conntrack now
    conntrack: bool = False  # conntrack names the flows
    health_hooks: str = ""  # TCP health features in use: "retransmits=tp_btf/...; ..."
    health_sockets: int = 0  # socket health records drained
    health_matched: int = 0  # ... joined to a flow this node saw
    # health events lost, by reason then feature (HEALTH_LOSS_REASONS x HEALTH_FEATURES): map_full
    # (the socket map was full), kernel_skipped (the kernel did not run the program: recursion on
    # that CPU; machine-wide), unjoined (the socket's flow was gone before a delta could carry them)
    health_lost: dict[str, dict[str, int]] = field(
        default_factory=lambda: {r: dict.fromkeys(HEALTH_FEATURES, 0) for r in HEALTH_LOSS_REASONS}
    )
    health_carried: int = 0  # health records held for the next poll (their flow had no delta yet)


def _globs(v: str) -> list[str]:
    return [g.strip() for g in v.split(",") if g.strip()]


def _unix(mono_ns: int) -> float:
    return mono_to_unix_ns(mono_ns) / 1e9


def to_count(c: FlowCount) -> Count:
    return Count(
        one_way_key(c.proto, c.family, c.saddr, c.daddr, c.sport, c.dport),
        c.family,
        c.packets,
        c.bytes,
        _unix(c.first_seen_ns),
        _unix(c.last_seen_ns),
        c.tcp_flags,
    )


class EbpfSource:
    """A flow source over TC counters on this namespace's interfaces (see the module docstring)."""

    name = "ebpf"

    def __init__(self, cfg: SourceConfig, observer: str) -> None:
        self.cfg = cfg
        self.observer = observer
        self.stats = EbpfStats(map_capacity=cfg.ebpf.max_entries)
        self.index = ConntrackIndex()
        self.lone = LoneFlows(observer, cfg.ebpf.idle_timeout, id_source("e"), socket.inet_ntop)
        self.counter: FlowCounter | None = None
        self.health: TcpHealth | None = None
        self.links: LinkWatcher | None = None
        self.conntrack: ConntrackSource | None = None
        self._epoll: select.epoll | None = None
        self._links: dict[int, Link] = {}
        self._include = _globs(cfg.ebpf.interfaces)
        self._exclude = _globs(cfg.ebpf.exclude_interfaces)
        self._deferred: list[Count] = []
        self._last_drops = 0
        # flow id -> health not yet put on a delta (retrans c2s, s2c, resets c2s, s2c, rtt c2s, s2c)
        self._carry: dict[str, tuple[DirKey, list[int]]] = {}
        # socket records no flow claimed yet: retried once at the next poll (the socket's flow may be
        # known only then: conntrack's event read later, or counts deferred to the next poll)
        self._unclaimed: list[SocketHealth] = []
        self._loss_warned = -LOSS_WARN_EVERY
        self._loss_unwarned = 0

    @property
    def tracker(self) -> FlowTracker | None:
        """The conntrack tracker (its stats feed the self-metrics), when conntrack runs."""
        return self.conntrack.tracker if self.conntrack else None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        try:
            ebpf = self.cfg.ebpf
            self.counter = FlowCounter(max_entries=ebpf.max_entries, attach_mode=ebpf.attach)
            self.stats.attach_mode = self.counter.attach_mode
            self.links = LinkWatcher()
            for link in self.links.start():
                self._links[link.index] = link
            for link in list(self._links.values()):
                self._consider(link)
            self._refresh_covers()
        except BaseException:
            self.close()
            raise
        log.info(
            "eBPF: attach backend %s (%s); counting on %d interface(s) (%s), %d bridge(s) covered",
            self.counter.attach_mode,
            self.counter.attach_reason,
            self.stats.interfaces,
            ", ".join(sorted(a.ifname for a in self.counter.attachments.values() if not a.covered)),
            self.stats.covered,
        )
        if self.cfg.ebpf.tcp_health:
            self._start_health()
        ct = ConntrackSource(self.cfg.conntrack, self.observer, need_counters=False, listener=self.index)
        try:
            ct.start()
            self.conntrack = ct
            self.stats.conntrack = True
        except ConntrackUnavailable as e:
            log.warning(
                "eBPF source without conntrack (%s): every byte is counted, but Service NAT is not seen "
                "through (client -> ClusterIP and backend -> client show as separate flows)",
                e,
            )
        self._epoll = select.epoll()
        self._epoll.register(self.links.fileno(), select.EPOLLIN)
        if self.conntrack is not None and (fd := self.conntrack.fileno()) is not None:
            self._epoll.register(fd, select.EPOLLIN)

    def _start_health(self) -> None:
        try:
            self.health = TcpHealth()
        except (EbpfError, OSError) as e:
            log.warning("TCP health unavailable (%s): flows are counted without it", e)
            return
        self.stats.health_hooks = "; ".join(f"{k}={v}" for k, v in self.health.hooks.items())
        for p in self.health.probes:
            if not p.ok:
                log.warning("TCP health: %s: %s", p.name, p.detail)
        log.info("TCP health: %s", self.stats.health_hooks or "no hook available")

    def fileno(self) -> int | None:
        return self._epoll.fileno() if self._epoll else None

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
            self.links = None
        if self.counter is not None:
            self.counter.close()  # detaches every link or filter we attached
            self.counter = None
        if self.health is not None:
            self.health.close()  # detaches the tracing programs
            self.health = None
        if self.conntrack is not None:
            self.conntrack.close()
            self.conntrack = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    # ---- links ---------------------------------------------------------------------------------
    def wanted(self, link: Link) -> bool:
        """Attach to this interface? Ethernet, not a bridge, not loopback, and the globs agree."""
        if not link.ethernet or link.bridge or not link.name:
            return False
        if any(fnmatch.fnmatchcase(link.name, g) for g in self._exclude):
            return False
        return not self._include or any(fnmatch.fnmatchcase(link.name, g) for g in self._include)

    def _consider(self, link: Link) -> None:
        fc = self.counter
        assert fc is not None
        if link.index in fc.attachments or not self.wanted(link):
            return
        try:
            fc.attach(link.index)
            self.stats.interfaces += 1
            log.debug("eBPF: attached to %s (ifindex %d)", link.name, link.index)
        except (EbpfError, OSError) as e:
            self.stats.attach_errors += 1
            log.warning("eBPF: cannot attach to %s: %s (its traffic is counted only elsewhere)", link.name, e)

    def _refresh_covers(self) -> None:
        """Cover each bridge whose ports are all attached; uncover one that gained another port."""
        fc = self.counter
        assert fc is not None
        atts = fc.attachments
        for br in [lk for lk in self._links.values() if lk.bridge]:
            ports = [lk for lk in self._links.values() if lk.master == br.index]
            ok = bool(ports) and all(p.index in atts and not atts[p.index].covered for p in ports)
            has = br.index in atts and atts[br.index].covered
            try:
                if ok and not has:
                    fc.cover(br.index)
                elif has and not ok:
                    fc.detach(br.index)
            except (EbpfError, OSError) as e:
                log.warning("eBPF: bridge %s: %s", br.name, e)
        self.stats.covered = sum(1 for a in fc.attachments.values() if a.covered)

    def _on_links(self) -> None:
        assert self.links is not None and self.counter is not None
        for kind, link in self.links.events():
            self.stats.link_events += 1
            old = self._links.get(link.index)
            if kind == "del":
                self._links.pop(link.index, None)
                att = self.counter.attachments.get(link.index)
                if self.counter.forget(link.index) and att is not None and not att.covered:
                    self.stats.interfaces -= 1
                    log.debug("eBPF: %s is gone", link.name)
                continue
            if old is not None and old.name != link.name and link.index in self.counter.attachments:
                self.counter.attachments[link.index].ifname = link.name  # renamed: same device
            self._links[link.index] = link
            self._consider(link)
        self._refresh_covers()

    def on_readable(self) -> None:
        if self._epoll is None:
            return
        fds = {fd for fd, _ in self._epoll.poll(0)}
        if self.links is not None and self.links.fileno() in fds:
            self._on_links()
        if self.conntrack is not None and self.conntrack.fileno() in fds:
            self.conntrack.on_readable()

    # ---- flows ---------------------------------------------------------------------------------
    def poll(self, final: bool = False) -> list[FlowDelta]:
        """Flow deltas since the last poll. ``final``: the agent is stopping, nothing waits for a
        later poll (counts conntrack did not name are paired at once)."""
        fc = self.counter
        assert fc is not None
        self.stats.polls += 1
        if self.links is not None:
            self._on_links()
        d = fc.drain()  # first: conntrack then knows every flow whose packets were drained
        self.stats.map_entries = len(d.flows)
        dropped = d.drops["map_full_packets"] + d.drops["other_packets"]
        self.stats.dropped_packets += dropped
        self.stats.dropped_bytes += d.drops["map_full_bytes"] + d.drops["other_bytes"]
        self.stats.dropped_map_full_packets += d.drops["map_full_packets"]
        self.stats.dropped_map_full_bytes += d.drops["map_full_bytes"]
        if dropped:
            log.warning(
                "eBPF flow map full: %d packets (%d bytes) not counted this interval; raise "
                "source.ebpf.max_entries (now %d) or shorten source.poll_interval",
                dropped,
                d.drops["map_full_bytes"] + d.drops["other_bytes"],
                self.cfg.ebpf.max_entries,
            )
        sockets: list[SocketHealth] = []
        if self.health is not None:
            hd = self.health.drain()
            sockets = hd.sockets
            self.stats.health_sockets += len(sockets)
            self._count_health_loss(hd.drops, hd.missed)
        ct_deltas = self.conntrack.poll() if self.conntrack is not None else []
        retry, self._deferred = self._deferred, []
        self.stats.counts += len(d.flows)
        out = self._join([to_count(c) for c in d.flows], retry, ct_deltas, final)
        if self.health is not None:
            self._add_health(out, sockets, final)
            self._warn_health_loss(final)
        self.index.end_poll()
        return out

    def _join(
        self, counts: list[Count], retry: list[Count], ct_deltas: list[FlowDelta], final: bool
    ) -> list[FlowDelta]:
        index = self.index
        acc: dict[str, list[float]] = {}  # fid -> bytes c2s, pkts c2s, bytes s2c, pkts s2c, last seen
        lone: list[Count] = []
        defer = self.conntrack is not None and not final
        for retried, batch in ((True, retry), (False, counts)):
            for c in batch:
                hit = index.lookup(c.key)
                if hit is None:
                    if defer and not retried:
                        # the drain may precede conntrack's confirmation of a new entry: one more poll
                        self._deferred.append(c)
                    else:
                        lone.append(c)
                    continue
                fid, direction = hit
                a = acc.get(fid)
                if a is None:
                    a = acc[fid] = [0, 0, 0, 0, 0.0]
                i = 0 if direction == C2S else 2
                a[i] += c.bytes
                a[i + 1] += c.packets
                a[4] = max(a[4], c.last_seen)
                self.stats.matched += 1
        out: list[FlowDelta] = []
        for dl in ct_deltas:  # conntrack's own lifecycle (opened/closed/state) with eBPF's counters
            a = acc.pop(dl.flow_id, None)
            if a is None and not (dl.opened or dl.closed):
                continue
            a = a or [0, 0, 0, 0, dl.last_seen]
            dl.source = "ebpf"
            dl.bytes_c2s, dl.packets_c2s, dl.bytes_s2c, dl.packets_s2c = (int(x) for x in a[:4])
            dl.last_seen = a[4] or dl.last_seen
            out.append(dl)
        for fid, a in acc.items():  # flows conntrack had nothing new about
            f = index.flows[fid]
            b1, p1, b2, p2 = (int(x) for x in a[:4])
            out.append(
                entry_delta(
                    f.entry,
                    fid,
                    self.observer,
                    self.name,
                    (b1, p1, b2, p2),
                    opened=False,
                    closed=False,
                    first_seen=f.first_seen,
                    last_seen=a[4],
                )
            )
        self.stats.unmatched += len(lone)
        self.lone.add(lone)
        out += self.lone.collect(time.time(), final=final)
        self.stats.lone_flows = len(self.lone)
        return out

    def _add_health(self, out: list[FlowDelta], sockets: list[SocketHealth], final: bool) -> None:
        """Put each socket's TCP health on the flow (and direction) its sending tuple belongs to;
        flows without events get zeros (the hooks exist: nothing happened). Health of a flow with no
        delta this poll (a retransmission seen by the tracepoint before its packet reached a TC
        hook, or after the flow's last delta) waits for the flow's next delta; if the flow is gone
        by then (or the agent stops) its events are counted lost (reason unjoined). A socket record
        no flow claims is retried once at the next poll (its flow may be known only then: conntrack's
        event not read yet, or its counts deferred); then it is a socket of no flow this node counts."""
        # flow id -> (a key of the flow, [retrans c2s, s2c, resets c2s, s2c, rtt c2s, s2c (-1: none),
        # rtt samples])
        by_fid: dict[str, tuple[DirKey, list[int]]] = {}
        for fid, (k, h) in self._carry.items():
            hit = self._flow_of(k)
            if hit is not None and hit[0] == fid:
                by_fid[fid] = (k, h)
            else:
                self._lose_unjoined(h)
        self._carry = {}
        retry, self._unclaimed = self._unclaimed, []
        for retried, sh in [*((True, x) for x in retry), *((False, x) for x in sockets)]:  # newest RTT last
            k = health_key(sh)
            hit = self._flow_of(k)
            if hit is None:
                if not retried and not final:
                    self._unclaimed.append(sh)
                continue  # after the retry: a socket of no flow this node counts (e.g. another node's)
            self.stats.health_matched += 1
            e = by_fid.get(hit[0])
            if e is None:
                e = by_fid[hit[0]] = (k, [0, 0, 0, 0, -1, -1, 0])
            h = e[1]
            i = 0 if hit[1] == C2S else 1
            h[i] += sh.retrans_segs
            h[2 + i] += sh.resets_sent
            if sh.rtt_samples:
                h[4 + i] = sh.srtt_us
                h[6] += sh.rtt_samples
        zero = [0, 0, 0, 0, -1, -1, 0]
        for d in out:
            h = by_fid[d.flow_id][1] if d.flow_id in by_fid else zero
            d.retransmits_c2s, d.retransmits_s2c, d.resets_c2s, d.resets_s2c = h[:4]
            d.rtt_us_c2s = h[4] if h[4] >= 0 else None
            d.rtt_us_s2c = h[5] if h[5] >= 0 else None
        put = {d.flow_id for d in out}
        for fid, (k, h) in by_fid.items():
            if fid in put:
                continue
            if final:
                self._lose_unjoined(h)
            else:
                self._carry[fid] = (k, h)
                self.stats.health_carried += 1
        if self._carry:
            log.debug(
                "TCP health of %d flow(s) without a delta this poll waits for the next one (%d retransmits)",
                len(self._carry),
                sum(h[0] + h[1] for _, h in self._carry.values()),
            )

    def _lose_unjoined(self, h: list[int]) -> None:
        lost = self.stats.health_lost["unjoined"]
        lost["retransmits"] += h[0] + h[1]
        lost["resets"] += h[2] + h[3]
        lost["rtt"] += h[6]
        self._loss_unwarned += h[0] + h[1] + h[2] + h[3] + h[6]

    def _count_health_loss(self, drops: dict[str, int], missed: dict[str, int]) -> None:
        """Count the health events a drain reports lost (the socket map was full, or the kernel
        skipped the program)."""
        lost = self.stats.health_lost
        for name, n in drops.items():
            if (f := DROP_FEATURE.get(name)) is not None and n:
                lost["map_full"][f] += n
                self._loss_unwarned += n
        for f, n in missed.items():
            if f in lost["kernel_skipped"] and n:
                lost["kernel_skipped"][f] += n
                self._loss_unwarned += n

    def _warn_health_loss(self, final: bool) -> None:
        """Warn about lost health events: at most once a minute, and once more when stopping."""
        now = time.monotonic()
        if self._loss_unwarned and (final or now - self._loss_warned >= LOSS_WARN_EVERY):
            lost = self.stats.health_lost
            log.warning(
                "TCP health: %d event(s) lost since the last warning (in all: %s); see "
                "otelflow_agent_ebpf_health_lost_events_total",
                self._loss_unwarned,
                "; ".join(
                    f"{r}: " + ", ".join(f"{f}={n}" for f, n in fs.items() if n)
                    for r, fs in lost.items()
                    if any(fs.values())
                ),
            )
            self._loss_warned, self._loss_unwarned = now, 0

    def _flow_of(self, k: DirKey) -> tuple[str, int] | None:
        return self.index.lookup(k) or self.lone.lookup(k)


def health_key(sh: SocketHealth) -> DirKey:
    """The one-way key of what a socket sends: local -> remote, as the TC programs key packets."""
    return one_way_key(6, sh.family, sh.laddr, sh.raddr, sh.lport, sh.rport)
