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
from typing import Any

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


def _dynamic_pairs(f: FlowDelta) -> list[tuple[str, str | int]]:
    pairs: list[tuple[str, str | int]] = [
        ("otelflow.flow.opened", int(f.opened)),
        ("otelflow.flow.closed", int(f.closed)),
        ("otelflow.flow.duration_ms", int((f.last_seen - f.first_seen) * 1000)),
    ]
    if f.state:
        pairs.append(("otelflow.flow.state", f.state))
    if f.bytes_c2s is not None:
        vals = (f.bytes_c2s, f.bytes_s2c or 0, f.packets_c2s or 0, f.packets_s2c or 0)
        pairs += list(zip(_COUNTER_KEYS, vals, strict=True))
    return pairs


def record_attributes(d: DecoratedFlow) -> list[tuple[str, str | int]]:
    """Every attribute of one flow-log record (the encoder builds the same set from cached parts)."""
    return (
        _static_pairs(d)
        + _peer_pairs("client", d.client)
        + _peer_pairs("server", d.server)
        + _dynamic_pairs(d.flow)
    )


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
_COUNTERS = pb.IntKeys(6, _COUNTER_KEYS)
# opened and closed attributes for every (opened, closed) pair, indexed by the flags
_OPEN_CLOSE = tuple(tuple(_OPENED.of_int(o) + _CLOSED.of_int(c) for c in (0, 1)) for o in (0, 1))


_CACHE_LIMIT = 100_000  # peers and TCP states per encoder; a cache is cleared when full
_FLOW_CACHE_LIMIT = 200_000  # flows' static attributes (about 0.5 kB each)


class LogsEncoder:
    """Decorated flows -> ExportLogsServiceRequest bytes, one LogRecord per flow delta, split under
    the request size limit.

    A record is joined from encoded fragments. What stays the same for every record of a flow
    (tuple, flow id, Service, NAT: ``_static_pairs``) is encoded at its first record and kept until
    its closing one (re-encoded if the flow's Service object changed), itself from pairs encoded once
    per value (server address and port, transport and family, Service, dialed address); a peer's
    attributes are encoded once per Peer object (by identity: the IP index hands out one object per
    owner, and the object is kept in the value so its id cannot be reused while cached); the
    record's own values (times, flags, duration, state, counters) are encoded from pre-framed keys
    (``pb.Key``). Every cache is bounded (cleared when full). The attributes are those of
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
        self._flows: dict[tuple[str, str], tuple[ServiceMeta | None, bytes]] = {}
        self._states: dict[str, bytes] = {}
        self._values: dict[tuple[str, str | int, str | int], bytes] = {}  # see _static

    def encode(self, batch: Iterable[DecoratedFlow], now_ns: int | None = None) -> list[Item]:
        tail = pb.log_tail(now_ns or time.time_ns(), EVENT_NAME)
        flt = None if self.filter.keeps_all else self.filter
        limit = self.max_request_bytes - len(self.resource) - len(self.scope) - 64
        record, frame = self._record, pb.item_frame
        items: list[Item] = []
        group: list[bytes] = []
        size = count = 0
        for d in batch:
            if not d.count_conn:
                continue  # the other node logs this flow
            if flt is not None and not flt.keep(d):
                self.filtered += 1
                continue
            rec = record(d, tail)
            head = frame(len(rec))
            n = len(head) + len(rec)
            if size + n > limit and group:
                items.append(Item("logs", pb.request(self.resource, self.scope, group, size), count))
                group, size, count = [], 0, 0
            group.append(head)
            group.append(rec)
            size += n
            count += 1
        if group:
            items.append(Item("logs", pb.request(self.resource, self.scope, group, size), count))
        return items

    def _record(self, d: DecoratedFlow, tail: bytes) -> bytes:
        """One LogRecord's bytes (without its log_records tag and length)."""
        f, svc, c, s = d.flow, d.service, d.client, d.server
        key = (f.observer, f.flow_id)
        hit = self._flows.get(key)
        static = hit[1] if hit is not None and hit[0] is svc else self._static(key, d)
        if f.closed:
            del self._flows[key]  # its last record: a flow id is never reused
        cached = self._clients.get(id(c))
        client = (
            cached[1] if cached is not None and cached[0] is c else self._peer(self._clients, "client", c)
        )
        cached = self._servers.get(id(s))
        server = (
            cached[1] if cached is not None and cached[0] is s else self._peer(self._servers, "server", s)
        )
        parts = [
            pb.LOG_HEAD.pack(pb.LOG_TIME_TAG, int(f.last_seen * 1e9), pb.LOG_SEVERITY_INFO),
            static,
            client,
            server,
            _OPEN_CLOSE[f.opened][f.closed],
            _DURATION.of_int(int((f.last_seen - f.first_seen) * 1000)),
        ]
        if f.state:
            st = self._states.get(f.state)
            parts.append(
                st if st is not None else self._cached(self._states, f.state, _STATE.of_str(f.state))
            )
        if f.bytes_c2s is not None:
            parts += _COUNTERS.fragments(
                (f.bytes_c2s, f.bytes_s2c or 0, f.packets_c2s or 0, f.packets_s2c or 0)
            )
        parts.append(tail)
        return b"".join(parts)

    def _static(self, key: tuple[str, str], d: DecoratedFlow) -> bytes:
        """What stays the same for every record of one flow while its Service does (see
        ``_static_pairs``); cached per flow until its closing record."""
        f, svc = d.flow, d.service
        values = self._values  # pairs that repeat across flows (server, Service, dialed address)
        server = ("s", f.server_ip, f.server_port)
        group = ("g", f.transport, f.family)
        origin = ("o", f.source, f.observer)
        parts = [
            _CLIENT_ADDR.of_str(f.client_ip),
            _CLIENT_PORT.of_int(f.client_port),
            values.get(server)
            or self._value(server, _SERVER_ADDR.of_str(f.server_ip) + _SERVER_PORT.of_int(f.server_port)),
            values.get(group)
            or self._value(group, _TRANSPORT.of_str(f.transport) + _NET_TYPE.of_str(f"ipv{f.family}")),
            _FLOW_ID.of_str(f"{f.observer}/{f.flow_id}"),
            values.get(origin)
            or self._value(origin, _SOURCE.of_str(f.source) + _OBSERVER.of_str(f.observer)),
        ]
        if svc is not None:
            sk = ("v", svc.name, svc.namespace)
            parts.append(
                values.get(sk)
                or self._value(sk, _SERVICE.of_str(svc.name) + _SERVICE_NS.of_str(svc.namespace))
            )
        if f.dnat or f.dialed_ip != f.server_ip:
            dk = ("d", f.dialed_ip, f.dialed_port)
            parts.append(
                values.get(dk)
                or self._value(dk, _DIALED_ADDR.of_str(f.dialed_ip) + _DIALED_PORT.of_int(f.dialed_port))
            )
        if f.snat:
            parts += (_NAT_ADDR.of_str(f.client_nat_ip), _NAT_PORT.of_int(f.client_nat_port))
        b = b"".join(parts)
        if len(self._flows) >= _FLOW_CACHE_LIMIT:
            self._flows.clear()
        self._flows[key] = (svc, b)
        return b

    def _value(self, key: tuple[str, str | int, str | int], b: bytes) -> bytes:
        if len(self._values) >= _CACHE_LIMIT:
            self._values.clear()
        self._values[key] = b
        return b

    @staticmethod
    def _cached(cache: dict[Any, bytes], key: Any, value: bytes) -> bytes:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = value
        return value

    def _peer(self, cache: dict[int, tuple[Peer, bytes]], prefix: str, p: Peer) -> bytes:
        b = b"".join(pb.ld(6, pb.keyvalue(k, v)) for k, v in _peer_pairs(prefix, p))
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[id(p)] = (p, b)
        return b
