"""The conntrack source, run as real agent processes in netlab nodes, against the lab's truth counters.

Each flow's deltas, summed over an agent's records, must equal the independent kernel count of that
flow exactly, per direction, on every node that sees it; roles and NAT must name the right client,
Service, backend and masqueraded address.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from otelflow.netlab import ns as nsu
from otelflow.netlab.agents import AgentRun, agents, endpoint_nodes, totals, truth
from otelflow.netlab.ctcli import conntrack_rows
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import NodeSpec, PodSpec, ServiceSpec, Topology, demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator

NODES = ["node-a", "node-b"]
# name -> (client, server, proto, nodes that see it; None: client's and backend's nodes)
SCENARIOS: dict[str, tuple[str, str, str, list[str] | None]] = {
    "same-node": ("frontend-0", "cart-0", "tcp", ["node-a"]),
    "cross-node": ("frontend-0", "db-0", "tcp", ["node-a", "node-b"]),
    "clusterip": ("frontend-1", "svc/payments", "tcp", None),
    "external": ("cart-0", "internet", "tcp", ["node-a"]),
    "from-external": ("internet", "db-0", "tcp", ["node-b"]),
    "host-network": ("node-exporter-a", "db-0", "tcp", ["node-a", "node-b"]),
    "udp-clusterip": ("frontend-1", "svc/dns", "udp", None),
}


@pytest.fixture(scope="module")
def scenario_run() -> Iterator[tuple[Lab, dict[tuple[str, int], FlowResult], dict[str, AgentRun]]]:
    """Every scenario in both families, concurrently, under one pair of agents."""
    with Lab(demo_topology()) as lab:
        specs = []
        for client, server, proto, _ in SCENARIOS.values():
            for fam in (4, 6):
                specs.append(
                    FlowSpec(client, server, proto=proto, family=fam, up=200_000 + fam, down=700_000 + fam)
                )  # type: ignore[arg-type]
        with agents(lab, NODES) as runs:
            results = TrafficGenerator(lab).run(specs)
            time.sleep(1.2)  # two more polls
        by_name = {}
        for i, name in enumerate(SCENARIOS):
            for j, fam in enumerate((4, 6)):
                by_name[(name, fam)] = results[2 * i + j]
        yield lab, by_name, runs


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_summed_deltas_equal_the_kernel_counter(scenario_run: Any, name: str, family: int) -> None:
    lab, by_name, runs = scenario_run
    r: FlowResult = by_name[(name, family)]
    assert r.ok, r.error
    client, server, _, nodes = SCENARIOS[name]
    seen_on = nodes if nodes is not None else endpoint_nodes(lab, r)
    for node in NODES:
        recs = runs[node].flows_of(r)
        if node not in seen_on:
            assert recs == [], f"{node} should not see {name}"
            continue
        assert recs, f"{node} reported nothing for {name}"
        assert totals(recs) == truth(r), f"{name} on {node}"
        assert sum(x["opened"] for x in recs) == 1
        if r.spec.proto == "tcp":
            assert sum(x["closed"] for x in recs) == 1  # TIME_WAIT reached
        last = recs[-1]
        assert ipaddress.ip_address(last["client_ip"]) == ipaddress.ip_address(r.client_ip)
        assert last["family"] == family and last["observer"] == node
        backend_ip = lab.endpoint(r.server_endpoint).ip(family)
        if server.startswith("svc/") and node == lab.endpoint(client).node:
            # the client's node did the DNAT: it knows both the ClusterIP and the backend
            assert ipaddress.ip_address(last["dialed_ip"]) == ipaddress.ip_address(r.dialed_ip)
            assert ipaddress.ip_address(last["server_ip"]) == backend_ip
            assert (
                last["dnat"] is True and last["server_port"] == lab.topology.service(server[4:]).target_port
            )
        else:
            assert ipaddress.ip_address(last["server_ip"]) == backend_ip
        if name == "external":
            assert last["snat"] is True
            assert ipaddress.ip_address(last["client_nat_ip"]) == lab.topology.node_ip("node-a", family)
    # the agent never zeroes counters: the table still holds the full totals (TIME_WAIT keeps TCP)
    if r.spec.proto == "tcp":
        rows = [
            x for x in conntrack_rows(lab.node_netns(seen_on[0])) if x.orig.get("sport") == str(r.client_port)
        ]
        assert rows and rows[0].count("orig", "bytes") == r.up_l3_bytes


def test_agents_exit_cleanly(scenario_run: Any) -> None:
    _, _, runs = scenario_run
    for run in runs.values():
        assert run.proc.returncode == 0, run.stderr[-2000:]
        assert "Traceback" not in run.stderr


@pytest.fixture()
def small_lab() -> Iterator[Lab]:
    t = Topology(
        nodes=(NodeSpec("n1"),),
        pods=(PodSpec("a", "n1"), PodSpec("b", "n1")),
        services=(ServiceSpec("s", 80, 8080, ("b",)), ServiceSpec("u", 53, 5353, ("b",), protocol="udp")),
    )
    with Lab(t) as lab:
        yield lab


def test_flows_closed_before_the_next_poll_count_exactly_once(small_lab: Lab) -> None:
    lab = small_lab
    node_ns = lab.node_netns("n1")
    # TIME_WAIT entries expire after 1 s: the next dump walks over them and the kernel destroys them
    nsu.sysctl(node_ns, {"net.netfilter.nf_conntrack_tcp_timeout_time_wait": 1})
    with agents(lab, ["n1"], poll=4.0) as runs:
        res = TrafficGenerator(lab).run(
            [
                FlowSpec("a", "svc/s", up=50_000, down=90_000),
                FlowSpec("a", "b", up=7_000, down=3_000, port=9100),
            ]
        )
        # one more flow deleted outright: its DESTROY event arrives at once
        [gone] = TrafficGenerator(lab).run([FlowSpec("a", "svc/u", proto="udp", up=1_000, down=2_000)])
        nsu.ns_run(node_ns, ["conntrack", "-D", "-p", "udp", "--orig-port-src", str(gone.client_port)])
        time.sleep(5.0)  # past the TIME_WAIT expiry and the next poll
    for r in [*res, gone]:
        assert r.ok, r.error
        recs = runs["n1"].flows_of(r)
        assert totals(recs) == truth(r)
        assert sum(x["opened"] for x in recs) == 1 and sum(x["closed"] for x in recs) == 1
        assert len(recs) == 1  # opened, counted and closed within one interval: one record
    assert not [x for x in conntrack_rows(node_ns) if x.orig.get("sport") == str(res[0].client_port)]


def test_flow_spanning_five_polls(small_lab: Lab) -> None:
    with agents(small_lab, ["n1"], poll=0.5) as runs:
        [r] = TrafficGenerator(small_lab).run(
            [FlowSpec("a", "svc/s", up=400_000, down=800_000, duration=3.5)]
        )
        time.sleep(1.2)
    assert r.ok, r.error
    recs = runs["n1"].flows_of(r)
    moving = [x for x in recs if (x["bytes_c2s"] or 0) + (x["bytes_s2c"] or 0) > 0]
    assert len(moving) >= 5
    assert totals(recs) == truth(r)
    assert len({x["flow_id"] for x in recs}) == 1


def test_thousand_concurrent_short_flows_and_event_overflow(small_lab: Lab) -> None:
    env = {"OTELFLOW_SOURCE__CONNTRACK__EVENT_BUFFER_BYTES": "65536"}
    with agents(small_lab, ["n1"], poll=1.0, extra_env=env) as runs:
        # freeze the agent so its event socket overflows while 1,000 flows open and close
        pid = runs["n1"].proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            flows = [FlowSpec("a", "b", up=500 + i, down=1500 + i, port=9200) for i in range(1000)]
            results = TrafficGenerator(small_lab, timeout=180).run(flows)
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(2.5)
    bad = [r for r in results if not r.ok]
    assert not bad, bad[0].error
    run = runs["n1"]
    assert "event socket overflowed" in run.stderr
    by_port: dict[int, list[dict[str, Any]]] = {}
    for x in run.records:
        by_port.setdefault(x["client_port"], []).append(x)
    mismatched = [r for r in results if totals(by_port.get(r.client_port, [])) != truth(r)]
    assert not mismatched, f"{len(mismatched)} of 1000 flows differ, e.g. port {mismatched[0].client_port}"


def test_accounting_off_is_reported_once_and_can_be_turned_on(small_lab: Lab) -> None:
    node_ns = small_lab.node_netns("n1")
    nsu.sysctl(node_ns, {"net.netfilter.nf_conntrack_acct": 0})
    with agents(small_lab, ["n1"], poll=0.5) as runs:
        [r] = TrafficGenerator(small_lab).run([FlowSpec("a", "b", up=1000, down=1000, port=9300)])
        time.sleep(1.2)
    err = runs["n1"].stderr
    assert err.count("conntrack accounting is off") == 1 and "nf_conntrack_acct=1" in err
    recs = runs["n1"].flows_of(r)
    assert recs and all(x["bytes_c2s"] is None and x["packets_s2c"] is None for x in recs)
    assert (
        sum(x["opened"] for x in recs) == 1 and sum(x["closed"] for x in recs) == 1
    )  # connections still count

    with agents(
        small_lab, ["n1"], poll=0.5, extra_env={"OTELFLOW_SOURCE__CONNTRACK__ENABLE_ACCT": "true"}
    ) as runs:
        [r2] = TrafficGenerator(small_lab).run([FlowSpec("a", "b", up=2000, down=4000, port=9301)])
        time.sleep(1.2)
    assert "turned it on" in runs["n1"].stderr
    assert nsu.ns_run(node_ns, ["sysctl", "-n", "net.netfilter.nf_conntrack_acct"]).strip() == "1"
    assert totals(runs["n1"].flows_of(r2)) == truth(r2)


def test_missing_capability_is_one_clear_line(small_lab: Lab) -> None:
    """Without CAP_NET_ADMIN (an unprivileged user) the agent says so in one line and exits 1."""
    import subprocess
    import sys

    p = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            small_lab.names.pod("a"),
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "otelflow",
            "run",
            "--source",
            "conntrack",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "OTELFLOW_API__LISTEN": ""},
    )
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("otelflow run:")]
    assert len(lines) == 1 and "CAP_NET_ADMIN" in lines[0], p.stderr
