"""The live view (what `otelflow top` reads): exact rates for known deltas, count-once across two
agents, window expiry, the memory cap, and the JSON API served over HTTP."""

from __future__ import annotations

import http.client
import itertools
import json

import pytest

from otelflow.decorate import DecoratedFlow
from otelflow.flow import FlowDelta
from otelflow.live import LiveView
from otelflow.meta.model import Peer, ServiceMeta
from otelflow.promexp import AgentHttpServer
from otelflow.top.model import merge
from otelflow.top.sources import AgentResult, HttpAgent

FRONTEND = Peer("pod", "pod", "node-a", "zone-a", "lab", "shop", "frontend-0", workload_name="frontend")
PAYMENTS = Peer("pod", "pod", "node-b", "zone-b", "lab", "shop", "payments-0", workload_name="payments")
CART = Peer("pod", "pod", "node-a", "zone-a", "lab", "shop", "cart-0", workload_name="cart")
INTERNET = Peer("external", "internet")
SVC = ServiceMeta("shop", "payments", ("10.96.0.10",))
_ids = itertools.count(1)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def delta(
    client: Peer,
    server: Peer,
    c2s: tuple[int, int],
    s2c: tuple[int, int],
    own: tuple[bool, bool],
    *,
    flow_id: str = "",
    client_port: int = 20001,
    closed: bool = False,
    service: ServiceMeta | None = None,
) -> DecoratedFlow:
    f = FlowDelta(
        flow_id=flow_id or f"auto-{next(_ids)}",
        source="conntrack",
        observer="node-a",
        family=4,
        transport="tcp",
        client_ip="10.244.1.2",
        client_port=client_port,
        dialed_ip="10.96.0.10" if service else "10.244.2.3",
        dialed_port=80 if service else 8080,
        server_ip="10.244.2.3",
        server_port=8080,
        client_nat_ip="10.244.1.2",
        client_nat_port=client_port,
        dnat=service is not None,
        snat=False,
        bytes_c2s=c2s[0],
        packets_c2s=c2s[1],
        bytes_s2c=s2c[0],
        packets_s2c=s2c[1],
        opened=True,
        closed=closed,
        state="ESTABLISHED",
        first_seen=95.0,
        last_seen=100.0,
    )
    return DecoratedFlow(f, client, server, service, own[0], own[1])


def two_agents() -> tuple[LiveView, LiveView, Clock]:
    """frontend (node-a, zone-a) -> Service payments -> payments-0 (node-b, zone-b): node-a owns
    the client's bytes, node-b the backend's; each sees the flow."""
    clock = Clock(95.0)
    a = LiveView("node-a", window=10.0, clock=clock)
    b = LiveView("node-b", window=10.0, clock=clock)
    clock.t = 100.0
    a.write([delta(FRONTEND, PAYMENTS, (1000, 10), (5000, 50), (True, False), flow_id="7", service=SVC)])
    b.write([delta(FRONTEND, PAYMENTS, (1000, 10), (5000, 50), (False, True), flow_id="3", service=SVC)])
    clock.t = 105.0
    return a, b, clock


def test_one_agent_counts_only_its_directions() -> None:
    a, _, _ = two_agents()
    snap = a.snapshot()
    assert snap["version"] == 1 and snap["node"] == "node-a"
    assert snap["span_seconds"] == 10.0
    (pair,) = snap["pairs"]
    assert (pair["client"]["label"], pair["server"]["label"], pair["service"]) == (
        "shop/frontend",
        "shop/payments",
        "shop/payments",
    )
    assert (pair["c2s_bps"], pair["c2s_pps"], pair["s2c_bps"], pair["s2c_pps"]) == (100.0, 1.0, 0.0, 0.0)
    assert pair["connections"] == 1 and pair["cross_zone"] is True and pair["external"] is False
    assert snap["totals"] == {
        "c2s_bps": 100.0,
        "s2c_bps": 0.0,
        "c2s_pps": 1.0,
        "s2c_pps": 0.0,
        "cross_zone_bps": 100.0,
        "external_bps": 0.0,
        "connections": 1,
    }


def test_two_agents_merge_to_each_byte_once() -> None:
    a, b, _ = two_agents()
    m = merge([AgentResult("a", a.snapshot(), ""), AgentResult("b", b.snapshot(), "")])
    (pair,) = m.pairs
    assert (pair["c2s_bps"], pair["s2c_bps"], pair["c2s_pps"], pair["s2c_pps"]) == (100.0, 500.0, 1.0, 5.0)
    assert pair["connections"] == 1  # counted where the client's bytes are: node-a only
    (conn,) = m.connections
    assert (conn["c2s_bps"], conn["s2c_bps"], conn["open_counted"]) == (100.0, 500.0, True)
    assert conn["dialed_port"] == 80  # the client's node knows the Service port
    nodes = {n["node"]: n for n in m.nodes}
    assert (nodes["node-a"]["tx_bps"], nodes["node-a"]["rx_bps"]) == (100.0, 500.0)
    assert (nodes["node-b"]["tx_bps"], nodes["node-b"]["rx_bps"]) == (500.0, 100.0)
    assert (nodes["node-a"]["cross_zone_bps"], nodes["node-b"]["cross_zone_bps"]) == (100.0, 500.0)
    assert (nodes["node-a"]["connections"], nodes["node-b"]["connections"]) == (1, 0)
    assert nodes["node-a"]["agent"] and nodes["node-b"]["agent"]
    assert m.totals["c2s_bps"] + m.totals["s2c_bps"] == 600.0
    assert m.totals["cross_zone_bps"] == 600.0 and m.totals["connections"] == 1


def test_rates_use_time_since_start_until_the_window_fills() -> None:
    clock = Clock(100.0)
    v = LiveView("node-a", window=10.0, clock=clock)
    clock.t = 104.0
    v.write([delta(CART, INTERNET, (400, 4), (2000, 8), (True, True))])
    snap = v.snapshot()
    assert snap["span_seconds"] == 4.0
    (p,) = snap["pairs"]
    assert (p["c2s_bps"], p["s2c_bps"], p["c2s_pps"], p["s2c_pps"]) == (100.0, 500.0, 1.0, 2.0)
    assert p["external"] is True and p["cross_zone"] is False
    assert p["server"]["label"] == "[internet]"
    assert snap["totals"]["external_bps"] == 600.0
    (n,) = snap["nodes"]  # the external end has no node
    assert (n["node"], n["tx_bps"], n["rx_bps"], n["external_bps"]) == ("node-a", 100.0, 500.0, 100.0)


def test_window_slides_and_closed_flows_leave() -> None:
    clock = Clock(0.0)
    v = LiveView("node-a", window=10.0, clock=clock)
    clock.t = 20.0
    v.write([delta(CART, INTERNET, (1000, 1), (0, 0), (True, True), flow_id="1")])
    clock.t = 25.0
    v.write([delta(CART, INTERNET, (3000, 3), (0, 0), (True, True), flow_id="1", closed=True)])
    v.write([delta(FRONTEND, PAYMENTS, (500, 5), (0, 0), (True, False), flow_id="2", client_port=20002)])
    clock.t = 29.0
    snap = v.snapshot()
    assert snap["totals"]["c2s_bps"] == 450.0  # (1000 + 3000 + 500) / 10
    assert snap["totals"]["connections"] == 1  # flow 1 closed, flow 2 open
    clock.t = 30.0  # the sample at t=20 leaves the window
    assert v.snapshot()["totals"]["c2s_bps"] == 350.0
    clock.t = 35.5  # both remaining samples left; the closed flow is forgotten, the open one stays
    snap = v.snapshot()
    assert snap["totals"]["c2s_bps"] == 0.0
    assert snap["stats"]["connections"] == 1 and snap["stats"]["expired"] == 1
    assert snap["totals"]["connections"] == 1


def test_cap_evicts_least_recently_active_and_counts_it() -> None:
    clock = Clock(0.0)
    v = LiveView("node-a", window=10.0, max_connections=2, clock=clock)
    for i, port in enumerate((30001, 30002, 30003)):
        clock.t = 1.0 + i
        v.write([delta(CART, INTERNET, (100, 1), (0, 0), (True, True), flow_id=str(i), client_port=port)])
    snap = v.snapshot()
    assert snap["stats"]["evicted"] == 1 and snap["stats"]["connections"] == 2
    assert sorted(c["client_port"] for c in snap["connections"]) == [30002, 30003]


def test_uncounted_deltas_stay_out() -> None:
    clock = Clock(0.0)
    v = LiveView("node-a", clock=clock)
    clock.t = 10.0
    v.write([delta(FRONTEND, PAYMENTS, (100, 1), (100, 1), (False, False))])
    snap = v.snapshot()
    assert snap["pairs"] == [] and snap["stats"]["uncounted"] == 1 and snap["stats"]["deltas"] == 1


def test_limit_caps_connection_rows_busiest_first() -> None:
    clock = Clock(0.0)
    v = LiveView("node-a", clock=clock)
    clock.t = 10.0
    v.write(
        [
            delta(CART, INTERNET, (100 * (i + 1), 1), (0, 0), (True, True), client_port=31000 + i)
            for i in range(5)
        ]
    )
    snap = v.snapshot(limit=2)
    assert [c["client_port"] for c in snap["connections"]] == [31004, 31003]
    assert snap["stats"]["connections_listed"] == 2 and snap["stats"]["connections"] == 5
    assert snap["pairs"][0]["c2s_bps"] == 150.0  # pairs always count every flow


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        LiveView("n", window=0)
    with pytest.raises(ValueError, match="max_connections"):
        LiveView("n", max_connections=0)


def test_served_over_http_and_read_by_top() -> None:
    a, _, _ = two_agents()
    srv = AgentHttpServer("127.0.0.1:0", lambda: "", lambda: True, a.snapshot)
    try:
        data = HttpAgent(f"http://127.0.0.1:{srv.port}").fetch(10)
        assert data["pairs"] == a.snapshot()["pairs"]
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/api/v1/top?limit=x")
        resp = conn.getresponse()
        assert resp.status == 400 and b"limit" in resp.read()
        conn.close()
    finally:
        srv.close()
    plain = AgentHttpServer("127.0.0.1:0", lambda: "", lambda: True)  # no live view: 404
    try:
        conn = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=5)
        conn.request("GET", "/api/v1/top")
        assert conn.getresponse().status == 404
        conn.close()
    finally:
        plain.close()


def test_snapshot_is_json() -> None:
    a, _, _ = two_agents()
    assert json.loads(json.dumps(a.snapshot()))["pairs"][0]["service"] == "shop/payments"


def test_loopback_is_not_external() -> None:
    clock = Clock(0.0)
    v = LiveView("node-a", clock=clock)
    clock.t = 10.0
    lo = Peer("external", "loopback")
    v.write([delta(lo, lo, (100, 1), (100, 1), (True, True))])
    (p,) = v.snapshot()["pairs"]
    assert p["external"] is False and p["client"]["label"] == "[loopback]"
