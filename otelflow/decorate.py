"""Decoration: name both ends of a flow delta, find its Service, and apply count-once."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from otelflow.countonce import CountOnce
from otelflow.flow import FlowDelta
from otelflow.meta.index import IpIndex
from otelflow.meta.model import Peer, ServiceMeta


@dataclass(slots=True)
class DecoratedFlow:
    flow: FlowDelta
    client: Peer
    server: Peer  # the end that answered (the backend pod behind a Service)
    service: ServiceMeta | None  # the Service the client addressed, or whose backend answered
    count_c2s: bool  # this node reports the client->server bytes
    count_s2c: bool  # this node reports the server->client bytes

    @property
    def count_conn(self) -> bool:
        """Connections are counted where the client->server bytes are."""
        return self.count_c2s

    def to_json(self) -> dict[str, Any]:
        d = self.flow.to_json()
        d["client"] = asdict(self.client)
        d["server"] = asdict(self.server)
        d["service"] = f"{self.service.namespace}/{self.service.name}" if self.service else None
        d["count_c2s"], d["count_s2c"] = self.count_c2s, self.count_s2c
        return d


class Decorator:
    def __init__(self, index: IpIndex, count_once: CountOnce) -> None:
        self.index = index
        self.count_once = count_once

    def decorate(self, f: FlowDelta) -> DecoratedFlow:
        idx = self.index
        at = f.first_seen
        client = idx.resolve(f.client_ip, 0, at)  # a client's port is ephemeral: it never names a pod
        server = idx.resolve(f.server_ip, f.server_port, at)
        service = idx.service_of(f.dialed_ip, f.dialed_port, f.transport)
        if service is None and server.kind == "pod":
            service = idx.service_for_backend(server.namespace, server.name, f.server_port, f.transport)
        # ownership uses the client as downstream nodes see it (after this node's SNAT, if any)
        seen = idx.resolve(f.client_nat_ip, 0, at) if f.snat and f.client_nat_ip != f.client_ip else client
        c2s, s2c = self.count_once.owns(seen, server, f.observer)
        return DecoratedFlow(f, client, server, service, c2s, s2c)
