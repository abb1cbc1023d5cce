"""Flow logs: one OTLP log record per flow per interval and at close, counted once cluster-wide.

A log record describes a connection, so its ends are `client.*` and `server.*` (semconv
`client.address`/`client.port`, `server.address`/`server.port`, with the same name attributes as
the metrics' ends under those prefixes). It is written by the node that counts the connection
(the client's node, or the server's when the client is outside), so each flow is logged once.
Filters (namespace, peer class, minimum bytes) and consistent sampling (by flow id, so a sampled
flow keeps all its records) keep the volume affordable.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from otelflow.decorate import DecoratedFlow
from otelflow.flow import FlowDelta
from otelflow.meta.model import Peer, ServiceMeta
from otelflow.otlp import encode as pb
from otelflow.otlp.exporter import Item

EVENT_NAME = "otelflow.flow"
DEFAULT_MAX_REQUEST = 3 << 20


@dataclass(frozen=True, slots=True)
class LogFilter:
    namespaces: frozenset[str] = frozenset()  # keep flows with an end in these namespaces (empty: all)
    classes: frozenset[str] = frozenset()  # keep flows with an end of these peer classes (empty: all)
    min_bytes: int = 0  # keep records moving at least this many bytes (closing records always kept)
    sample: float = 1.0  # fraction of flows kept (consistent per flow)

    @property
    def keeps_all(self) -> bool:
        """True when no flow can be filtered out (the encoder then skips ``keep``)."""
        return not self.namespaces and not self.classes and self.min_bytes <= 0 and self.sample >= 1.0

    def keep(self, d: DecoratedFlow) -> bool:
        if self.namespaces and not ({d.client.namespace, d.server.namespace} & self.namespaces):
            return False
        if self.classes and not ({d.client.peer_class, d.server.peer_class} & self.classes):
            return False
        f = d.flow
        moved = (f.bytes_c2s or 0) + (f.bytes_s2c or 0)
        if moved < self.min_bytes and not f.closed and not f.opened:
            return False
        if self.sample < 1.0:
            h = zlib.crc32(f"{f.observer}/{f.flow_id}".encode()) / 0xFFFFFFFF
            return h < self.sample
        return True


def _peer_pairs(prefix: str, p: Peer) -> list[tuple[str, str | int]]:
    pairs: list[tuple[str, str | int]] = []
    for k, v in (
        ("k8s.namespace.name", p.namespace),
        ("k8s.pod.name", p.name if p.kind == "pod" else ""),
        ("k8s.pod.uid", p.uid),
        ("k8s.workload.name", p.workload_name),
        ("k8s.workload.kind", p.workload_kind),
        ("k8s.node.name", p.node),
        ("cloud.availability_zone", p.zone),
        ("cloud.region", p.region),
        ("otelflow.peer.class", p.peer_class),
        ("otelflow.peer.name", p.name if p.kind in ("node", "host") else ""),
    ):
        if v:
            pairs.append((f"{prefix}.{k}", v))
    return pairs


def _static_pairs(d: DecoratedFlow) -> list[tuple[str, str | int]]:
    """What stays the same for every record of one flow."""
    f = d.flow
    pairs: list[tuple[str, str | int]] = [
        ("client.address", f.client_ip),
        ("client.port", f.client_port),
        ("server.address", f.server_ip),
        ("server.port", f.server_port),
        ("network.transport", f.transport),
        ("network.type", f"ipv{f.family}"),
        ("otelflow.flow.id", f"{f.observer}/{f.flow_id}"),
        ("otelflow.flow.source", f.source),
        ("otelflow.observer", f.observer),
    ]
    if d.service:
        pairs += [("k8s.service.name", d.service.name), ("otelflow.service.namespace", d.service.namespace)]
    if f.dnat or f.dialed_ip != f.server_ip:
        pairs += [("otelflow.nat.dialed.address", f.dialed_ip), ("otelflow.nat.dialed.port", f.dialed_port)]
    if f.snat:
        pairs += [
            ("otelflow.nat.client.address", f.client_nat_ip),
            ("otelflow.nat.client.port", f.client_nat_port),
        ]
    return pairs


_COUNTER_KEYS = (
    "otelflow.flow.bytes.c2s",
    "otelflow.flow.bytes.s2c",
    "otelflow.flow.packets.c2s",
    "otelflow.flow.packets.s2c",
)
# TCP health per direction (eBPF source): retransmitted segments and resets sent by that direction's
# sender (int), its latest smoothed RTT (double, seconds: the unit of the otelflow.tcp.rtt metric and
# of semconv durations)
_HEALTH_INT_KEYS = (
    "otelflow.tcp.retransmits.c2s",
    "otelflow.tcp.retransmits.s2c",
    "otelflow.tcp.resets.c2s",
    "otelflow.tcp.resets.s2c",
)
_RTT_KEYS = ("otelflow.tcp.rtt.c2s", "otelflow.tcp.rtt.s2c")


def _dynamic_pairs(f: FlowDelta) -> list[tuple[str, str | int | float]]:
    pairs: list[tuple[str, str | int | float]] = [
        ("otelflow.flow.opened", int(f.opened)),
        ("otelflow.flow.closed", int(f.closed)),
        ("otelflow.flow.duration_ms", int((f.last_seen - f.first_seen) * 1000)),
    ]
    if f.state:
        pairs.append(("otelflow.flow.state", f.state))
    if f.bytes_c2s is not None:
        vals = (f.bytes_c2s, f.bytes_s2c or 0, f.packets_c2s or 0, f.packets_s2c or 0)
        pairs += list(zip(_COUNTER_KEYS, vals, strict=True))
    if f.transport == "tcp":
        health = (f.retransmits_c2s, f.retransmits_s2c, f.resets_c2s, f.resets_s2c)
        pairs += [(k, v) for k, v in zip(_HEALTH_INT_KEYS, health, strict=True) if v is not None]
        rtts = (f.rtt_us_c2s, f.rtt_us_s2c)
        pairs += [(k, v / 1e6) for k, v in zip(_RTT_KEYS, rtts, strict=True) if v is not None]
    return pairs


def record_attributes(d: DecoratedFlow) -> list[tuple[str, str | int | float]]:
    """Every attribute of one flow-log record (the encoder builds the same set from cached parts)."""
    fixed: list[tuple[str, str | int | float]] = [
        *_static_pairs(d),
        *_peer_pairs("client", d.client),
        *_peer_pairs("server", d.server),
    ]
    return fixed + _dynamic_pairs(d.flow)


def _keys(*names: str) -> tuple[pb.Key, ...]:
    return tuple(pb.Key(6, n) for n in names)  # LogRecord.attributes = 6


_CLIENT_ADDR, _CLIENT_PORT, _SERVER_ADDR, _SERVER_PORT, _FLOW_ID = _keys(
    "client.address", "client.port", "server.address", "server.port", "otelflow.flow.id"
)
_TRANSPORT, _NET_TYPE, _SOURCE, _OBSERVER, _SERVICE, _SERVICE_NS = _keys(
    "network.transport",
    "network.type",
    "otelflow.flow.source",
    "otelflow.observer",
    "k8s.service.name",
    "otelflow.service.namespace",
)
_DIALED_ADDR, _DIALED_PORT, _NAT_ADDR, _NAT_PORT = _keys(
    "otelflow.nat.dialed.address",
    "otelflow.nat.dialed.port",
    "otelflow.nat.client.address",
    "otelflow.nat.client.port",
)
_OPENED, _CLOSED, _DURATION, _STATE = _keys(
    "otelflow.flow.opened", "otelflow.flow.closed", "otelflow.flow.duration_ms", "otelflow.flow.state"
)
# each counter's pre-framed prefixes by value length (pb.Key.of_int without the call)
_BYTES_C2S, _BYTES_S2C, _PACKETS_C2S, _PACKETS_S2C = (pb.Key(6, k).int_prefixes for k in _COUNTER_KEYS)
_HEALTH_INTS = pb.IntKeys(6, _HEALTH_INT_KEYS)
# retransmits and resets below 128 (nearly all): the whole attribute per value, looked up
_HEALTH_SMALL = tuple({v: pb.Key(6, k).of_int(v) for v in range(128)} for k in _HEALTH_INT_KEYS)
_RTT_C2S, _RTT_S2C = (pb.Key(6, k).double_prefix for k in _RTT_KEYS)  # + 8 bytes of the double
# opened and closed attributes for every (opened, closed) pair, indexed by the flags, each followed by
# the duration's key for every varint length: [opened][closed][len] + varint(duration)
_OC_DURATION = tuple(
    tuple(tuple(_OPENED.of_int(o) + _CLOSED.of_int(c) + p for p in _DURATION.int_prefixes) for c in (0, 1))
    for o in (0, 1)
)
_LOG_RECORD_TAG = b"\x12"  # ScopeLogs.log_records = 2


_CLIENT_ADDR_S, _CLIENT_PORT_I, _FLOW_ID_S = (
    _CLIENT_ADDR.str_prefixes,
    _CLIENT_PORT.int_prefixes,
    _FLOW_ID.str_prefixes,
)


_CACHE_LIMIT = 100_000  # peers and TCP states per encoder; a cache is cleared when full
_FLOW_CACHE_LIMIT = 200_000  # flows' fixed attributes (about 0.5 kB each)


class LogsEncoder:
    """Decorated flows -> ExportLogsServiceRequest bytes, one LogRecord per flow delta, split under
    the request size limit.

    A record is joined from encoded fragments. What stays the same for every record of a flow (tuple,
    flow id, Service, NAT: ``_static_pairs``; both ends' names: ``_peer_pairs``) is encoded at its
    first record and kept, keyed by flow id, until its closing one; it is used again only while the
    record's Service and both Peer objects are the very objects it was built from (identity checks:
    the IP index hands out one object per owner, and the entry holds them, so an id cannot be reused
    while cached), else it is built again. It is itself joined from pairs encoded once per value
    (server address and port, transport and family, Service, dialed address) and per Peer object.
    The record's own values (time, flags, duration, state, counters, TCP health) are encoded inline
    from pre-framed keys (``pb.Key``): a record costs a few lookups and one join, and no Python-level
    call unless its flow is new. Every cache is bounded (cleared when full). The attributes are those of
    ``record_attributes``, in the same order (checked against it in tests/unit/test_otlp_content.py)."""

    def __init__(
        self,
        resource_attrs: Sequence[tuple[str, str]],
        scope_name: str,
        scope_version: str,
        flt: LogFilter | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST,
    ) -> None:
        self.resource = pb.resource(resource_attrs)
        self.scope = pb.scope(scope_name, scope_version)
        self.filter = flt or LogFilter()
        self.max_request_bytes = max_request_bytes
        self.filtered = 0
        self._clients: dict[int, tuple[Peer, bytes]] = {}
        self._servers: dict[int, tuple[Peer, bytes]] = {}
        # flow id -> (Service, client, server, observer, (the flow's own fixed attributes, the
        # client's, the server's))
        self._flows: dict[str, tuple[ServiceMeta | None, Peer, Peer, str, tuple[bytes, bytes, bytes]]] = {}
        self._states: dict[str, bytes] = {}
        self._values: dict[tuple[str | int | None, ...], tuple[bytes, bytes]] = {}  # see _fixed

    def encode(self, batch: Iterable[DecoratedFlow], now_ns: int | None = None) -> list[Item]:
        tail = pb.log_tail(now_ns or time.time_ns(), EVENT_NAME)
        flt = None if self.filter.keeps_all else self.filter
        limit = self.max_request_bytes - len(self.resource) - len(self.scope) - 64
        flows, states = self._flows, self._states
        flows_get, states_get, fixed = flows.get, states.get, self._fixed
        head_pack, time_tag, severity = pb.LOG_HEAD.pack, pb.LOG_TIME_TAG, pb.LOG_SEVERITY_INFO
        small, cont, varint, tag = pb.SMALL_VARINTS, pb.CONT_VARINTS, pb.varint, _LOG_RECORD_TAG
        oc_dur = _OC_DURATION
        ret_c2s, ret_s2c, rst_c2s, rst_s2c = _HEALTH_SMALL
        rtt_c2s, rtt_s2c, dpack = _RTT_C2S, _RTT_S2C, pb.DOUBLE
        last_time, head = None, b""
        b_c2s, b_s2c, p_c2s, p_s2c = _BYTES_C2S, _BYTES_S2C, _PACKETS_C2S, _PACKETS_S2C
        items: list[Item] = []
        group: list[bytes] = []
        add = group.append
        size = count = 0
        for d in batch:
            if not d.count_c2s:  # count_conn: the other node logs this flow
                continue
            if flt is not None and not flt.keep(d):
                self.filtered += 1
                continue
            f = d.flow
            fid = f.flow_id
            hit = flows_get(fid)
            if (
                hit is not None
                and hit[0] is d.service
                and hit[1] is d.client
                and hit[2] is d.server
                and hit[3] == f.observer
            ):
                fixed_b, client_b, server_b = hit[4]
            else:
                fixed_b, client_b, server_b = fixed(d)
            if f.closed:
                del flows[fid]  # its last record: a flow id is never reused
            last = f.last_seen
            if last != last_time:  # records of one poll share it (conntrack: the poll's time)
                last_time = last
                head = head_pack(time_tag, int(last * 1e9), severity)
            v = int((last - f.first_seen) * 1000)
            dur = small[v] if 0 <= v < 16384 else varint(v)
            st = f.state
            if st:
                st_b = states_get(st)
                if st_b is None:
                    st_b = self._state(st)
            else:
                st_b = b""
            v = f.bytes_c2s
            if v is not None:
                # the four counters, each a varint after its pre-framed key (pb.Key.of_int inline)
                if 0 <= v < 16384:
                    b = small[v]
                elif 0 < v < 268435456:
                    b = cont[v & 16383] + small[v >> 14]
                else:
                    b = varint(v)
                v2 = f.bytes_s2c or 0
                if 0 <= v2 < 16384:
                    b2 = small[v2]
                elif 0 < v2 < 268435456:
                    b2 = cont[v2 & 16383] + small[v2 >> 14]
                else:
                    b2 = varint(v2)
                v3 = f.packets_c2s or 0
                if 0 <= v3 < 16384:
                    b3 = small[v3]
                elif 0 < v3 < 268435456:
                    b3 = cont[v3 & 16383] + small[v3 >> 14]
                else:
                    b3 = varint(v3)
                v4 = f.packets_s2c or 0
                if 0 <= v4 < 16384:
                    b4 = small[v4]
                elif 0 < v4 < 268435456:
                    b4 = cont[v4 & 16383] + small[v4 >> 14]
                else:
                    b4 = varint(v4)
                parts = [
                    head, fixed_b, client_b, server_b, oc_dur[f.opened][f.closed][len(dur)], dur, st_b,
                    b_c2s[len(b)], b, b_s2c[len(b2)], b2, p_c2s[len(b3)], b3, p_s2c[len(b4)], b4,
                ]  # fmt: skip
            else:
                parts = [head, fixed_b, client_b, server_b, oc_dur[f.opened][f.closed][len(dur)], dur, st_b]
            r1, r2, r3, r4 = f.retransmits_c2s, f.retransmits_s2c, f.resets_c2s, f.resets_s2c
            t1, t2 = f.rtt_us_c2s, f.rtt_us_s2c
            if (
                r1 is not None
                or r2 is not None
                or r3 is not None
                or r4 is not None
                or t1 is not None
                or t2 is not None
            ) and f.transport == "tcp":  # TCP health (eBPF source); conntrack flows pay the checks only
                a1, a2, a3, a4 = ret_c2s.get(r1), ret_s2c.get(r2), rst_c2s.get(r3), rst_s2c.get(r4)
                if a1 is not None and a2 is not None and a3 is not None and a4 is not None:
                    parts += (a1, a2, a3, a4)  # the usual: every count there, each below 128
                else:
                    parts += _health_ints(r1, r2, r3, r4)
                if t1 is not None:
                    parts += (rtt_c2s, dpack(t1 / 1e6))
                if t2 is not None:
                    parts += (rtt_s2c, dpack(t2 / 1e6))
            parts.append(tail)
            rec = b"".join(parts)
            n = len(rec)
            frame = small[n] if n < 16384 else varint(n)
            n += 1 + len(frame)
            if size + n > limit and group:
                items.append(Item("logs", pb.request(self.resource, self.scope, group, size), count))
                group, size, count = [], 0, 0
                add = group.append
            add(tag)
            add(frame)
            add(rec)
            size += n
            count += 1
        if group:
            items.append(Item("logs", pb.request(self.resource, self.scope, group, size), count))
        return items

    def _fixed(self, d: DecoratedFlow) -> tuple[bytes, bytes, bytes]:
        """A flow's fixed attributes (``_static_pairs`` + both ends' ``_peer_pairs``), cached until
        its closing record; built again when the Service or a Peer object changed. Built from pairs
        that repeat across flows (server and network; origin, Service and dialed address; each Peer),
        each encoded once, and the flow's own tuple and id."""
        f, svc, c, s = d.flow, d.service, d.client, d.server
        dialed = f.dnat or f.dialed_ip != f.server_ip
        key = (
            f.server_ip,
            f.server_port,
            f.transport,
            f.family,
            f.source,
            f.observer,
            svc.name if svc is not None else None,
            svc.namespace if svc is not None else None,
            f.dialed_ip if dialed else None,
            f.dialed_port if dialed else None,
        )
        shared = self._values.get(key)
        if shared is None:  # (server and network, origin + Service + dialed address) around the flow id
            b = _SOURCE.of_str(f.source) + _OBSERVER.of_str(f.observer)
            if svc is not None:
                b += _SERVICE.of_str(svc.name) + _SERVICE_NS.of_str(svc.namespace)
            if dialed:
                b += _DIALED_ADDR.of_str(f.dialed_ip) + _DIALED_PORT.of_int(f.dialed_port)
            shared = self._value(key, (
                _SERVER_ADDR.of_str(f.server_ip) + _SERVER_PORT.of_int(f.server_port)
                + _TRANSPORT.of_str(f.transport) + _NET_TYPE.of_str(f"ipv{f.family}"),
                b,
            ))  # fmt: skip
        cached = self._clients.get(id(c))
        client = (
            cached[1] if cached is not None and cached[0] is c else self._peer(self._clients, "client", c)
        )
        cached = self._servers.get(id(s))
        server_peer = (
            cached[1] if cached is not None and cached[0] is s else self._peer(self._servers, "server", s)
        )
        ip, fid, port = f.client_ip.encode(), f"{f.observer}/{f.flow_id}".encode(), f.client_port
        if len(ip) < pb.SHORT_STR and len(fid) < pb.SHORT_STR and 0 <= port < 65536:  # Key.of_* inline
            p = (
                pb.SMALL_VARINTS[port]
                if port < 16384
                else pb.CONT_VARINTS[port & 16383] + pb.SMALL_VARINTS[port >> 14]
            )
            parts = [_CLIENT_ADDR_S[len(ip)], ip, _CLIENT_PORT_I[len(p)], p, shared[0],
                     _FLOW_ID_S[len(fid)], fid, shared[1]]  # fmt: skip
        else:
            parts = [
                _CLIENT_ADDR.of_str(f.client_ip),
                _CLIENT_PORT.of_int(f.client_port),
                shared[0],
                _FLOW_ID.of_str(f"{f.observer}/{f.flow_id}"),
                shared[1],
            ]
        if f.snat:
            parts += (_NAT_ADDR.of_str(f.client_nat_ip), _NAT_PORT.of_int(f.client_nat_port))
        # the peers' blocks are shared with every flow of the same Peer: referenced, not copied
        out = (b"".join(parts), client, server_peer)
        if len(self._flows) >= _FLOW_CACHE_LIMIT:
            self._flows.clear()
        self._flows[f.flow_id] = (svc, c, s, f.observer, out)
        return out

    def _value(self, key: tuple[str | int | None, ...], b: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
        if len(self._values) >= _CACHE_LIMIT:
            self._values.clear()
        self._values[key] = b
        return b

    def _state(self, state: str) -> bytes:
        if len(self._states) >= _CACHE_LIMIT:
            self._states.clear()
        b = self._states[state] = _STATE.of_str(state)
        return b

    def _peer(self, cache: dict[int, tuple[Peer, bytes]], prefix: str, p: Peer) -> bytes:
        b = b"".join(pb.ld(6, pb.keyvalue(k, v)) for k, v in _peer_pairs(prefix, p))
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[id(p)] = (p, b)
        return b


def _health_ints(*values: int | None) -> list[bytes]:
    """Retransmits and resets per direction, each present when not None (see ``_dynamic_pairs``)."""
    frags = _HEALTH_INTS.fragments([v or 0 for v in values])
    return [b for b, v in zip(frags, values, strict=True) if v is not None]
