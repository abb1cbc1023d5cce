"""Merging several agents' `/api/v1/top` answers into one cluster view.

Each agent's answer holds only the directions it counts (count-once), so the cluster view is a sum
by key: nodes by name, workload pairs by (client, server, Service, transport, server port, flags),
connections by (transport, client address and port, server address and port). A connection seen by
two nodes, each owning one direction, becomes one row with both halves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from otelflow.top.sources import AgentResult

RATE_KEYS = ("c2s_bps", "s2c_bps", "c2s_pps", "s2c_pps")
NODE_KEYS = ("tx_bps", "rx_bps", "tx_pps", "rx_pps", "cross_zone_bps", "external_bps")


@dataclass
class AgentStatus:
    name: str
    node: str
    ok: bool
    error: str = ""


@dataclass
class Model:
    agents: list[AgentStatus] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    connections: list[dict[str, Any]] = field(default_factory=list)
    window: float = 0.0
    connections_total: int = 0  # flows the agents hold (rows may be capped per agent)
    evicted: int = 0
    problem: str = ""  # a source-wide problem (discovery failed, no agents)


def _sum_into(into: dict[str, Any], row: dict[str, Any], keys: tuple[str, ...]) -> None:
    for k in keys:
        into[k] = into.get(k, 0.0) + float(row.get(k, 0.0))


def merge(results: list[AgentResult], problem: str = "") -> Model:
    m = Model(problem=problem)
    totals: dict[str, float] = dict.fromkeys(
        (*RATE_KEYS, "cross_zone_bps", "external_bps", "connections"), 0.0
    )
    nodes: dict[str, dict[str, Any]] = {}
    pairs: dict[tuple[Any, ...], dict[str, Any]] = {}
    conns: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in results:
        d = r.data
        if d is None:
            m.agents.append(AgentStatus(r.name, "", False, r.error))
            continue
        m.agents.append(AgentStatus(r.name, str(d.get("node", "")), True))
        m.window = max(m.window, float(d.get("window_seconds", 0.0)))
        stats = d.get("stats", {})
        m.connections_total += int(stats.get("connections", 0))
        m.evicted += int(stats.get("evicted", 0))
        _sum_into(totals, d.get("totals", {}), tuple(totals))
        for n in d.get("nodes", []):
            row = nodes.setdefault(n["node"], {"node": n["node"], "zone": "", "connections": 0})
            row["zone"] = row["zone"] or n.get("zone", "")
            row["connections"] += int(n.get("connections", 0))
            _sum_into(row, n, NODE_KEYS)
        for p in d.get("pairs", []):
            key = (
                p["client"]["label"],
                p["server"]["label"],
                p.get("service", ""),
                p.get("transport", ""),
                p.get("server_port", 0),
                bool(p.get("cross_zone")),
                bool(p.get("external")),
            )
            row = pairs.get(key)
            if row is None:
                row = pairs[key] = {k: v for k, v in p.items() if k not in RATE_KEYS}
                row["connections"] = 0
            row["connections"] += int(p.get("connections", 0))
            _sum_into(row, p, RATE_KEYS)
        for c in d.get("connections", []):
            key = (c["transport"], c["client_ip"], c["client_port"], c["server_ip"], c["server_port"])
            row = conns.get(key)
            if row is None:
                row = conns[key] = {k: v for k, v in c.items() if k not in RATE_KEYS}
                row["open_counted"] = False
            row["open_counted"] = row["open_counted"] or bool(c.get("open") and c.get("counts_connection"))
            row["open"] = bool(row.get("open")) and bool(c.get("open"))
            if c.get("service") and not row.get("service"):
                row["service"] = c["service"]
            if c.get("counts_connection"):  # the client's node names the dialed port (a Service's)
                row["dialed_port"] = c.get("dialed_port", row.get("dialed_port"))
            _sum_into(row, c, RATE_KEYS)
    for n in nodes.values():
        n["agent"] = any(a.ok and a.node == n["node"] for a in m.agents)
    m.totals = totals
    m.nodes = list(nodes.values())
    m.pairs = list(pairs.values())
    m.connections = list(conns.values())
    return m
