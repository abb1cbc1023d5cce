"""Two agents on two nodes, named by the lab's inventory: every flow's both ends carry the right
names, and summing the counted directions over the cluster gives each byte exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otelflow.netlab.agents import AgentRun, agents, counted, truth
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator

NODES = ["node-a", "node-b"]
# name -> (client, server, proto, expected client name, expected server name (None: a backend), service)
SCENARIOS: dict[str, tuple[str, str, str, str, str | None, str | None]] = {
    "same-node": ("frontend-0", "cart-0", "tcp", "shop/frontend-0", "shop/cart-0", None),
    "cross-node": ("frontend-0", "db-0", "tcp", "shop/frontend-0", "data/db-0", None),
    "clusterip": ("frontend-1", "svc/payments", "tcp", "shop/frontend-1", None, "shop/payments"),
    "clusterip-db": ("payments-1", "svc/db", "tcp", "shop/payments-1", "data/db-0", "data/db"),
    "external": ("cart-0", "internet", "tcp", "shop/cart-0", "internet", None),
    "from-external": ("internet", "frontend-1", "tcp", "internet", "shop/frontend-1", None),
    "host-network": ("node-exporter-a", "db-0", "tcp", "node-a", "data/db-0", None),
    "to-node": ("frontend-1", "node-a", "tcp", "shop/frontend-1", "node-a", None),
    "udp-clusterip": ("frontend-1", "svc/dns", "udp", "shop/frontend-1", "shop/cart-0", "shop/dns"),
}


def name_of(peer: dict[str, Any]) -> str:
    if peer["kind"] == "pod":
        return f"{peer['namespace']}/{peer['name']}"
    if peer["kind"] == "node":
        return peer["name"]
    return peer["peer_class"]


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Lab, dict[tuple[str, int], FlowResult], dict[str, AgentRun]]]:
    with Lab(demo_topology()) as lab:
        inv = lab.write_inventory(str(Path(tmp_path_factory.mktemp("inv")) / "inventory.yaml"))
        specs, keys = [], []
        for name, (client, server, proto, *_rest) in SCENARIOS.items():
            for fam in (4, 6):
                specs.append(
                    FlowSpec(client, server, proto=proto, family=fam, up=150_000 + fam, down=450_000 + fam)
                )  # type: ignore[arg-type]
                keys.append((name, fam))
        with agents(lab, NODES, inventory=inv) as runs:
            results = TrafficGenerator(lab).run(specs)
            time.sleep(1.2)
        yield lab, dict(zip(keys, results, strict=True)), runs


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_cluster_sum_counts_every_byte_once(run: Any, name: str, family: int) -> None:
    _, results, runs = run
    r: FlowResult = results[(name, family)]
    assert r.ok, r.error
    recs = [x for node in NODES for x in runs[node].flows_of(r)]
    assert recs
    # 0.0% error: the cluster-wide sum of counted bytes and packets equals the kernel's truth
    assert counted(recs) == truth(r)
    # connections once too
    assert sum(x["opened"] for x in recs if x["count_c2s"]) == 1


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_both_ends_are_named(run: Any, name: str) -> None:
    lab, results, runs = run
    _, _, _, want_client, want_server, want_service = SCENARIOS[name]
    for fam in (4, 6):
        r = results[(name, fam)]
        server = want_server or f"{lab.topology.pod(r.server_endpoint).namespace}/{r.server_endpoint}"
        for node in NODES:
            for x in runs[node].flows_of(r):
                assert name_of(x["client"]) == want_client, (node, x["client"])
                assert name_of(x["server"]) == server, (node, x["server"])
                assert x["service"] == want_service, (node, x["service"])
                if x["server"]["kind"] == "pod":
                    pod = lab.topology.pod(x["server"]["name"])
                    assert x["server"]["workload_name"] == pod.workload
                    assert x["server"]["zone"] == lab.topology.node(pod.node).zone
