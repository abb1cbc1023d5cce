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
from otelflow.meta.model import Peer
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


class LogsEncoder:
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
        self._kv = pb.KvCache(6)
        self._peers: dict[tuple[str, int], tuple[Peer, bytes]] = {}
        self._flows: dict[tuple[str, str], bytes] = {}
        self._keys = {k: pb.ld(1, k.encode()) for k in (*_COUNTER_KEYS, "otelflow.flow.duration_ms")}
        self._event = pb.ld(12, EVENT_NAME.encode())

    def _peer_block(self, prefix: str, p: Peer) -> bytes:
        # keyed by identity (the IP index hands out one Peer object per owner); the Peer is kept in
        # the value so its id cannot be reused while cached
        key = (prefix, id(p))
        hit = self._peers.get(key)
        if hit is not None and hit[0] is p:
            return hit[1]
        if len(self._peers) > 100_000:
            self._peers.clear()
        b = self._kv.block(_peer_pairs(prefix, p))
        self._peers[key] = (p, b)
        return b

    def attributes_block(self, d: DecoratedFlow) -> bytes:
        """The record's attributes: cached static and peer parts plus the per-record values."""
        f = d.flow
        fk = (f.observer, f.flow_id)
        static = self._flows.get(fk)
        if static is None:
            if len(self._flows) > 200_000:
                self._flows.clear()
            static = self._flows[fk] = self._kv.block(_static_pairs(d))
        if f.closed:
            self._flows.pop(fk, None)
        kv, ik, keys = self._kv, pb.int_kv, self._keys
        parts = [
            static,
            self._peer_block("client", d.client),
            self._peer_block("server", d.server),
            kv.get("otelflow.flow.opened", int(f.opened)),
            kv.get("otelflow.flow.closed", int(f.closed)),
            ik(6, keys["otelflow.flow.duration_ms"], int((f.last_seen - f.first_seen) * 1000)),
        ]
        if f.state:
            parts.append(kv.get("otelflow.flow.state", f.state))
        if f.bytes_c2s is not None:
            parts += [
                ik(6, keys[_COUNTER_KEYS[0]], f.bytes_c2s),
                ik(6, keys[_COUNTER_KEYS[1]], f.bytes_s2c or 0),
                ik(6, keys[_COUNTER_KEYS[2]], f.packets_c2s or 0),
                ik(6, keys[_COUNTER_KEYS[3]], f.packets_s2c or 0),
            ]
        return b"".join(parts)

    def encode(self, batch: Iterable[DecoratedFlow], now_ns: int | None = None) -> list[Item]:
        now = now_ns or time.time_ns()
        recs = []
        for d in batch:
            if not d.count_conn:
                continue  # the other node logs this flow
            if not self.filter.keep(d):
                self.filtered += 1
                continue
            t = int(d.flow.last_seen * 1e9)
            recs.append(pb.log_record(t, now, self.attributes_block(d), self._event))
        limit = self.max_request_bytes - len(self.resource) - len(self.scope) - 64
        return [
            Item("logs", pb.logs_request(self.resource, self.scope, group, framed=True), len(group))
            for group in pb.chunks(recs, limit)
        ]
