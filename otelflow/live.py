"""The live view: what `otelflow top` shows, kept by each agent and served as JSON (`/api/v1/top`).

A sink of the pipeline like the exporter. It keeps one entry per flow this agent counts (at least
one direction owned under count-once), with the counted bytes and packets of the last ``window``
seconds, and derives from them, on request, three views:

- **nodes**: per node, what its endpoints sent and received (bytes/s, packets/s), how much of it
  crossed zones or left the cluster, and the connections its clients opened;
- **pairs**: per client workload -> server workload (+ Service, transport, server port, zone/external
  flags), bytes/s and packets/s each way, and active connections;
- **connections**: per flow, the same numbers.

Only counted directions ever enter the view, so a byte is in exactly one agent's answer: merging
several agents (top does) is a sum by key, with no double counting. A connection seen by two nodes
(each owning one direction) appears in both answers under the same key (client address and port,
answering server address and port, transport) and top adds the halves.

Memory is bounded: at most ``max_connections`` entries. A closed flow is dropped once its last
bytes leave the window; an open flow stays (it is an active connection) until it closes or, when the
cap is reached, the least recently active entry is evicted to make room (counted in ``evicted``).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from otelflow.decorate import DecoratedFlow
from otelflow.meta.model import Peer

API_VERSION = 1
API_PATH = "/api/v1/top"
DEFAULT_LIMIT = 500  # connection rows per answer (nodes and pairs are always complete)


def peer_label(p: Peer) -> str:
    """How top names one end: namespace/workload for pods, kind/name for nodes and hosts, [class]."""
    if p.kind == "pod":
        return f"{p.namespace}/{p.workload_name or p.name}"
    if p.kind in ("node", "host"):
        return f"{p.kind}/{p.name}"
    if p.kind == "service":
        return f"svc/{p.namespace}/{p.name}"
    return f"[{p.peer_class}]"


NODE_LOCAL_CLASSES = frozenset({"loopback", "link-local", "multicast"})


def is_external(p: Peer) -> bool:
    """Outside the cluster: an inventory host, or an address nobody in the cluster owns (but
    node-local ones: loopback, link-local, multicast)."""
    return p.kind == "host" or (p.kind == "external" and p.peer_class not in NODE_LOCAL_CLASSES)


@dataclass(slots=True)
class _Conn:
    client: Peer
    server: Peer
    service: str
    transport: str
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    dialed_port: int
    counts_conn: bool
    opened_at: float
    last_active: float
    closed: bool = False
    # (time, bytes c2s, packets c2s, bytes s2c, packets s2c) per poll, counted directions only
    samples: deque[tuple[float, int, int, int, int]] = field(default_factory=deque)

    @property
    def cross_zone(self) -> bool:
        return bool(self.client.zone and self.server.zone and self.client.zone != self.server.zone)

    @property
    def external(self) -> bool:
        return is_external(self.client) or is_external(self.server)


def _sums(samples: deque[tuple[float, int, int, int, int]]) -> tuple[int, int, int, int]:
    bc = pc = bs = ps = 0
    for _, a, b, c, d in samples:
        bc += a
        pc += b
        bs += c
        ps += d
    return bc, pc, bs, ps


class LiveView:
    """Pipeline sink keeping the last ``window`` seconds of counted traffic for `otelflow top`."""

    def __init__(
        self,
        node: str,
        window: float = 10.0,
        max_connections: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window <= 0:
            raise ValueError("live view window must be > 0")
        if max_connections < 1:
            raise ValueError("live view max_connections must be >= 1")
        self.node = node
        self.window = window
        self.max_connections = max_connections
        self.clock = clock
        self.started = clock()
        self.lock = threading.Lock()
        self.conns: dict[str, _Conn] = {}
        self.evicted = 0  # open entries dropped to stay under max_connections
        self.expired = 0  # closed entries whose bytes left the window
        self.deltas = 0  # decorated deltas seen
        self.uncounted = 0  # deltas with no direction owned here (another node reports them)

    # -- sink ------------------------------------------------------------------------------------

    def write(self, deltas: Sequence[DecoratedFlow]) -> None:
        now = self.clock()
        with self.lock:
            for d in deltas:
                self._add(d, now)
            self._expire(now)

    def tick(self) -> None:
        with self.lock:
            self._expire(self.clock())

    def close(self) -> None:
        pass

    def _add(self, d: DecoratedFlow, now: float) -> None:
        self.deltas += 1
        f = d.flow
        if not (d.count_c2s or d.count_s2c):
            self.uncounted += 1
            return
        c = self.conns.get(f.flow_id)
        if c is None:
            if len(self.conns) >= self.max_connections:
                self._evict_one()
            svc = f"{d.service.namespace}/{d.service.name}" if d.service else ""
            c = _Conn(
                d.client,
                d.server,
                svc,
                f.transport,
                f.client_ip,
                f.client_port,
                f.server_ip,
                f.server_port,
                f.dialed_port,
                d.count_conn,
                f.first_seen,
                now,
            )
            self.conns[f.flow_id] = c
        bc = (f.bytes_c2s or 0) if d.count_c2s else 0
        pc = (f.packets_c2s or 0) if d.count_c2s else 0
        bs = (f.bytes_s2c or 0) if d.count_s2c else 0
        ps = (f.packets_s2c or 0) if d.count_s2c else 0
        if bc or pc or bs or ps:
            c.samples.append((now, bc, pc, bs, ps))
            c.last_active = now
        if f.closed:
            c.closed = True

    def _evict_one(self) -> None:
        victim = min(self.conns, key=lambda k: self.conns[k].last_active)
        del self.conns[victim]
        self.evicted += 1

    def _expire(self, now: float) -> None:
        cut = now - self.window
        gone = []
        for k, c in self.conns.items():
            s = c.samples
            while s and s[0][0] <= cut:
                s.popleft()
            if c.closed and not s:
                gone.append(k)
        for k in gone:
            del self.conns[k]
        self.expired += len(gone)

    # -- the JSON answer -------------------------------------------------------------------------

    def snapshot(self, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
        """The view as JSON-ready data: rates are counted bytes (packets) per second over the window
        (or over the time since the agent started, while that is shorter)."""
        with self.lock:
            now = self.clock()
            self._expire(now)
            span = max(min(self.window, now - self.started), 1e-9)
            conns = [(c, _sums(c.samples)) for c in self.conns.values()]
            stats = {
                "connections": len(self.conns),
                "max_connections": self.max_connections,
                "evicted": self.evicted,
                "expired": self.expired,
                "deltas": self.deltas,
                "uncounted": self.uncounted,
            }
        nodes: dict[str, dict[str, Any]] = {}
        pairs: dict[tuple[Any, ...], dict[str, Any]] = {}
        totals = _zero_rates() | {"cross_zone_bps": 0.0, "external_bps": 0.0, "connections": 0}
        rows: list[tuple[float, _Conn, dict[str, float]]] = []
        for c, (bc, pc, bs, ps) in conns:
            active = 1 if c.counts_conn and not c.closed else 0
            rates = {
                "c2s_bps": bc / span,
                "s2c_bps": bs / span,
                "c2s_pps": pc / span,
                "s2c_pps": ps / span,
            }
            cz, ext = c.cross_zone, c.external
            both = (bc + bs) / span
            _add_rates(totals, rates)
            totals["cross_zone_bps"] += both if cz else 0.0
            totals["external_bps"] += both if ext else 0.0
            totals["connections"] += active
            # nodes: the client's node sent c2s and received s2c; the server's node the reverse
            for peer, tx_b, tx_p, rx_b, rx_p in (
                (c.client, bc, pc, bs, ps),
                (c.server, bs, ps, bc, pc),
            ):
                if not peer.node:
                    continue
                n = nodes.setdefault(peer.node, _node_row(peer.node, peer.zone))
                n["tx_bps"] += tx_b / span
                n["tx_pps"] += tx_p / span
                n["rx_bps"] += rx_b / span
                n["rx_pps"] += rx_p / span
                n["cross_zone_bps"] += (tx_b / span) if cz else 0.0
                n["external_bps"] += (tx_b / span) if ext else 0.0
            if c.client.node and active:
                nodes[c.client.node]["connections"] += 1
            key = (
                peer_label(c.client),
                peer_label(c.server),
                c.service,
                c.transport,
                c.server_port,
                cz,
                ext,
            )
            p = pairs.get(key)
            if p is None:
                p = pairs[key] = {
                    "client": _peer_json(c.client, workload_level=True),
                    "server": _peer_json(c.server, workload_level=True),
                    "service": c.service,
                    "transport": c.transport,
                    "server_port": c.server_port,
                    "cross_zone": cz,
                    "external": ext,
                    **_zero_rates(),
                    "connections": 0,
                    "flows": 0,
                }
            _add_rates(p, rates)
            p["connections"] += active
            p["flows"] += 1
            rows.append((both, c, rates))
        busiest = heapq.nlargest(limit, rows, key=lambda r: r[0])  # JSON only for the rows sent
        listed = [
            {
                "client": _peer_json(c.client),
                "server": _peer_json(c.server),
                "service": c.service,
                "transport": c.transport,
                "client_ip": c.client_ip,
                "client_port": c.client_port,
                "server_ip": c.server_ip,
                "server_port": c.server_port,
                "dialed_port": c.dialed_port,
                "cross_zone": c.cross_zone,
                "external": c.external,
                "open": not c.closed,
                "counts_connection": c.counts_conn,
                **rates,
            }
            for _, c, rates in busiest
        ]
        return {
            "version": API_VERSION,
            "node": self.node,
            "time": now,
            "window_seconds": self.window,
            "span_seconds": span,
            "stats": {**stats, "connections_listed": len(listed)},
            "totals": totals,
            "nodes": sorted(nodes.values(), key=lambda n: n["node"]),
            "pairs": list(pairs.values()),
            "connections": listed,
        }


def _zero_rates() -> dict[str, Any]:
    return {"c2s_bps": 0.0, "s2c_bps": 0.0, "c2s_pps": 0.0, "s2c_pps": 0.0}


def _add_rates(into: dict[str, Any], rates: dict[str, float]) -> None:
    for k, v in rates.items():
        into[k] += v


def _node_row(node: str, zone: str) -> dict[str, Any]:
    return {
        "node": node,
        "zone": zone,
        "tx_bps": 0.0,
        "rx_bps": 0.0,
        "tx_pps": 0.0,
        "rx_pps": 0.0,
        "cross_zone_bps": 0.0,
        "external_bps": 0.0,
        "connections": 0,
    }


def _peer_json(p: Peer, workload_level: bool = False) -> dict[str, str]:
    """One end as JSON. At workload level (pairs) a pod end is its workload: the pod's own name,
    node and zone are left empty, since the pair stands for every pod of the workload."""
    pod = workload_level and p.kind == "pod"
    return {
        "label": peer_label(p),
        "kind": p.kind,
        "class": p.peer_class,
        "namespace": p.namespace,
        "name": "" if pod else p.name,
        "workload": p.workload_name or (p.name if pod else ""),
        "node": "" if pod else p.node,
        "zone": "" if pod else p.zone,
    }
