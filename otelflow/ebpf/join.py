"""Turn the TC counter's one-way counts into flows (pure: no kernel).

The TC programs count each packet once per node, keyed by the 5-tuple it carries where it was
counted: at the first interface it entered through (before any NAT of this node), or at the egress
of a locally sent packet (after it). A conversation therefore shows up as two or more one-way keys,
and a Service conversation as keys that do not even mirror each other (client -> ClusterIP one way,
backend -> client the other). conntrack knows which keys belong together:

    original tuple            client -> dialed            c2s, seen before NAT (ingress)
    reply tuple               server -> client-after-SNAT s2c, seen before NAT (ingress)
    reply tuple, reversed     client-after-SNAT -> server c2s, seen after NAT (a local sender's egress)
    original tuple, reversed  dialed -> client            s2c, seen after NAT (a local server's egress)

:class:`ConntrackIndex` keeps these four keys of every conntrack flow instance (fed by the conntrack
tracker's start/end notices), so a key names its flow and direction, and a Service conversation is
one flow with one id, never two (the flaw of sources that report what each packet says).

What conntrack does not know (conntrack absent, a flow it does not track) goes to
:class:`LoneFlows`, which pairs a key with its mirror and decides who is the client: the side that
sent a SYN without ACK; else the side whose port is clearly ephemeral (one side below 1024 or the
Linux ephemeral range 32768+, the other not); else the side heard first. Such a flow has no NAT
view (dialed = server). It is opened when first seen (TCP: when its SYN is seen), closed on RST, on
FIN both ways, or after ``idle_timeout`` seconds without a packet.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from otelflow.conntrack.netlink import CtEntry
from otelflow.flow import FlowDelta, transport_name

DirKey = tuple[int, bytes, bytes, int, int]  # proto, src, dst, sport, dport (4- or 16-byte addresses)
C2S, S2C = 0, 1
TCP = 6
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
EPHEMERAL_MIN = 32768  # Linux ip_local_port_range default start
GRACE_POLLS = 3  # an ended conntrack flow still claims its keys this long (late packets)


def one_way_key(proto: int, family: int, src: bytes, dst: bytes, sport: int, dport: int) -> DirKey:
    """A DirKey from the programs' 16-byte addresses (IPv4 as ::ffff:a.b.c.d, conntrack's 4 bytes)."""
    if family == 4:
        return (proto, src[12:], dst[12:], sport, dport)
    return (proto, src, dst, sport, dport)


def mirror(k: DirKey) -> DirKey:
    return (k[0], k[2], k[1], k[4], k[3])


def _keys(e: CtEntry) -> Iterator[tuple[DirKey, int, int]]:
    """(key, direction, priority): the exact tuples first (0), their post-NAT mirrors after (1)."""
    o, r = e.orig, e.reply
    ko = (o.proto, o.src, o.dst, o.sport, o.dport)
    kr = (r.proto, r.src, r.dst, r.sport, r.dport)
    yield ko, C2S, 0
    yield kr, S2C, 0
    yield mirror(kr), C2S, 1
    yield mirror(ko), S2C, 1


@dataclass(slots=True)
class CtFlow:
    entry: CtEntry
    first_seen: float
    ended_gen: int = -1  # poll generation in which conntrack dropped it; -1 while live


class ConntrackIndex:
    """conntrack flow instances by every key their packets can carry on this node (a
    TrackerListener: see otelflow.conntrack.tracker)."""

    def __init__(self, grace_polls: int = GRACE_POLLS) -> None:
        self.grace_polls = grace_polls
        self.flows: dict[str, CtFlow] = {}
        self._by_key: dict[DirKey, tuple[str, int, int]] = {}  # key -> fid, direction, priority
        self._ended: list[str] = []
        self._gen = 0

    def __len__(self) -> int:
        return len(self.flows)

    def started(self, fid: str, entry: CtEntry, first_seen: float) -> None:
        self.flows[fid] = CtFlow(entry, first_seen)
        by_key = self._by_key
        for k, d, prio in _keys(entry):
            cur = by_key.get(k)
            if cur is None or prio <= cur[2]:  # the newest instance of a reused tuple wins
                by_key[k] = (fid, d, prio)

    def ended(self, fid: str, entry: CtEntry) -> None:
        f = self.flows.get(fid)
        if f is not None and f.ended_gen < 0:
            f.ended_gen = self._gen
            self._ended.append(fid)

    def lookup(self, k: DirKey) -> tuple[str, int] | None:
        hit = self._by_key.get(k)
        return (hit[0], hit[1]) if hit else None

    def end_poll(self) -> None:
        """Forget the keys of flows that ended ``grace_polls`` polls ago."""
        self._gen += 1
        keep: list[str] = []
        for fid in self._ended:
            f = self.flows[fid]
            if self._gen - f.ended_gen < self.grace_polls:
                keep.append(fid)
                continue
            del self.flows[fid]
            for k, _, _ in _keys(f.entry):
                hit = self._by_key.get(k)
                if hit is not None and hit[0] == fid:
                    del self._by_key[k]
        self._ended = keep


@dataclass(slots=True)
class Count:
    """One one-way count of one drain: the TC counter's FlowCount reduced to what joining needs."""

    key: DirKey
    family: int  # 4 | 6
    packets: int
    bytes: int
    first_seen: float  # unix seconds
    last_seen: float
    tcp_flags: int


@dataclass(slots=True)
class _Lone:
    fid: str
    family: int
    proto: int
    client: tuple[bytes, int]
    server: tuple[bytes, int]
    first_seen: float
    last_seen: float
    flags: list[int] = field(default_factory=lambda: [0, 0])  # OR of TCP flags, per direction
    pend: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # bytes c2s, pkts c2s, bytes s2c, pkts s2c
    opened: bool = False
    closed: bool = False
    close_reported: bool = False
    dirty: bool = False


def _client_side(counts: list[Count]) -> int:
    """Index into ``counts`` (one or both directions of one pair, first drain) of a count whose
    source is the client."""
    if counts[0].key[0] == TCP:
        for i, c in enumerate(counts):
            if c.tcp_flags & SYN and not c.tcp_flags & ACK:
                return i
        for i, c in enumerate(counts):
            if c.tcp_flags & SYN and c.tcp_flags & ACK:
                return 1 - i if len(counts) == 2 else -1
    k = counts[0].key
    sport, dport = k[3], k[4]
    for lim in (1024, EPHEMERAL_MIN):  # the server's port is the clearly smaller class
        if (dport < lim) != (sport < lim):
            return 0 if dport < lim else -1
    if len(counts) == 2:
        return 0 if counts[0].first_seen <= counts[1].first_seen else 1
    return 0


class LoneFlows:
    """Flows conntrack does not name: mirror pairs, the client guessed (see the module docstring)."""

    def __init__(
        self,
        observer: str,
        idle_timeout: float,
        ids: Callable[[], str],
        inet_ntop: Callable[[int, bytes], str],
    ) -> None:
        self.observer = observer
        self.idle_timeout = idle_timeout
        self._ids = ids
        self._ntop = inet_ntop
        self._flows: dict[DirKey, _Lone] = {}  # canonical key (client -> server) -> flow
        self._dir: dict[DirKey, tuple[DirKey, int]] = {}  # either key -> canonical key, direction

    def __len__(self) -> int:
        return len(self._flows)

    def add(self, counts: Iterable[Count]) -> None:
        groups: dict[DirKey, list[Count]] = {}
        for c in counts:
            k = c.key
            groups.setdefault(min(k, mirror(k)), []).append(c)
        for group in groups.values():
            f = None
            hit = self._dir.get(group[0].key)
            if hit is not None:
                f = self._flows[hit[0]]
                new_syn = any(c.key[0] == TCP and c.tcp_flags & SYN and not c.tcp_flags & ACK for c in group)
                if f.close_reported and new_syn:  # the tuple reused by a new connection
                    self._drop(hit[0])
                    f = None
            if f is None:
                f = self._start(group)
            for c in group:
                d = self._dir[c.key][1]
                f.pend[2 * d] += c.bytes
                f.pend[2 * d + 1] += c.packets
                f.flags[d] |= c.tcp_flags
                f.last_seen = max(f.last_seen, c.last_seen)
                f.dirty = True
            if f.proto == TCP and not f.close_reported:
                fl = f.flags
                if (fl[0] | fl[1]) & RST or (fl[0] & FIN and fl[1] & FIN):
                    f.closed = True

    def _start(self, group: list[Count]) -> _Lone:
        i = _client_side(group)
        k = group[i].key if i >= 0 else mirror(group[0].key)  # -1: the only count is server -> client
        proto, src, dst, sport, dport = k
        first = min(x.first_seen for x in group)
        f = _Lone(self._ids(), group[0].family, proto, (src, sport), (dst, dport), first, first)
        f.opened = proto != TCP or any(x.tcp_flags & SYN for x in group)
        self._flows[k] = f
        self._dir[k] = (k, C2S)
        self._dir[mirror(k)] = (k, S2C)
        return f

    def lookup(self, k: DirKey) -> tuple[str, int] | None:
        """(flow id, direction) of a one-way key of a tracked lone flow."""
        hit = self._dir.get(k)
        return (self._flows[hit[0]].fid, hit[1]) if hit else None

    def _drop(self, canon: DirKey) -> None:
        self._flows.pop(canon, None)
        self._dir.pop(canon, None)
        self._dir.pop(mirror(canon), None)

    def collect(self, now: float, final: bool = False) -> list[FlowDelta]:
        out: list[FlowDelta] = []
        for canon, f in list(self._flows.items()):
            idle = now - f.last_seen >= self.idle_timeout
            if idle and not f.close_reported:
                f.closed = True
            if f.closed and not f.close_reported:
                f.close_reported = f.dirty = True
            if f.dirty:
                out.append(self._record(f))
            if f.close_reported and (idle or final):
                self._drop(canon)
        return out

    def _record(self, f: _Lone) -> FlowDelta:
        ca, cp = f.client
        sa, sp = f.server
        af = socket.AF_INET if f.family == 4 else socket.AF_INET6
        client, server = self._ntop(af, ca), self._ntop(af, sa)
        state = None
        if f.proto == TCP:
            state = "CLOSE" if f.close_reported else ("ESTABLISHED" if f.flags[0] & ACK else "SYN_SENT")
        d = FlowDelta(
            flow_id=f.fid,
            source="ebpf",
            observer=self.observer,
            family=f.family,
            transport=transport_name(f.proto),
            client_ip=client,
            client_port=cp,
            dialed_ip=server,
            dialed_port=sp,
            server_ip=server,
            server_port=sp,
            client_nat_ip=client,
            client_nat_port=cp,
            dnat=False,
            snat=False,
            bytes_c2s=f.pend[0],
            packets_c2s=f.pend[1],
            bytes_s2c=f.pend[2],
            packets_s2c=f.pend[3],
            opened=f.opened,
            closed=f.closed,
            state=state,
            first_seen=f.first_seen,
            last_seen=f.last_seen,
        )
        f.pend = [0, 0, 0, 0]
        f.opened = f.closed = f.dirty = False
        return d


def id_source(prefix: str) -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter):x}"
