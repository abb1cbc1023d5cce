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


def _end_pairs(prefix: str, p: Peer, address: str, port: int) -> list[tuple[str, str | int]]:
    pairs: list[tuple[str, str | int]] = [(f"{prefix}.address", address), (f"{prefix}.port", port)]
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


def record_attributes(d: DecoratedFlow) -> list[tuple[str, str | int]]:
    f = d.flow
    pairs = _end_pairs("client", d.client, f.client_ip, f.client_port)
    pairs += _end_pairs("server", d.server, f.server_ip, f.server_port)
    pairs += [
        ("network.transport", f.transport),
        ("network.type", f"ipv{f.family}"),
        ("otelflow.flow.id", f"{f.observer}/{f.flow_id}"),
        ("otelflow.flow.source", f.source),
        ("otelflow.observer", f.observer),
        ("otelflow.flow.opened", int(f.opened)),
        ("otelflow.flow.closed", int(f.closed)),
        ("otelflow.flow.duration_ms", int((f.last_seen - f.first_seen) * 1000)),
    ]
    if f.state:
        pairs.append(("otelflow.flow.state", f.state))
    if f.bytes_c2s is not None:
        pairs += [
            ("otelflow.flow.bytes.c2s", f.bytes_c2s),
            ("otelflow.flow.bytes.s2c", f.bytes_s2c or 0),
            ("otelflow.flow.packets.c2s", f.packets_c2s or 0),
            ("otelflow.flow.packets.s2c", f.packets_s2c or 0),
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
            recs.append(pb.log_record(t, now, pb.attributes(record_attributes(d), field=6), EVENT_NAME))
        limit = self.max_request_bytes - len(self.resource) - len(self.scope) - 64
        return [
            Item("logs", pb.logs_request(self.resource, self.scope, group), len(group))
            for group in pb.chunks(recs, limit)
        ]
