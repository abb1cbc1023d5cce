"""Two agents on two netlab nodes, named by a real kube-apiserver (v1.35, built from Go modules)
under the shipped ServiceAccount, ClusterRole and ClusterRoleBinding (manifests/base: exactly the
cache's RBAC rules); no inventory.

* every scenario's both ends carry the right pod, workload, zone and Service names, and the
  cluster-wide sum of counted bytes equals the kernel's truth (0.0% error);
* a pod deleted and replaced by another pod with the same IP mid-flow: the running flow keeps the
  old pod's name, a new flow from that IP gets the new pod's;
* the API server stopped for 60 s: the agents keep naming flows from what they know, and converge
  when it returns (a pod registered after the restart is named).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from otelflow.deploy_render import MANIFESTS
from otelflow.k8s.cache import RBAC_RULES
from otelflow.k8s.client import KubeClient, kubeconfig_config
from otelflow.netlab.agents import agents, counted, truth
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import demo_topology
from otelflow.netlab.traffic import FlowSpec, TrafficGenerator
from otelflow.testing.kubeapi import KubeAPI, write_kubeconfig
from otelflow.testing.kubelab import LabRegistrar, relays

NODES = ["node-a", "node-b"]
SHIPPED_RBAC = ("base/serviceaccount.yaml", "base/clusterrole.yaml", "base/clusterrolebinding.yaml")
LATE = ("payments-0",)  # registered in the API server only after its outage
FE0, FE1, DB = "shop/frontend-0", "shop/frontend-1", "data/db-0"
# name -> (flow, the client's expected name, the server's (None: whichever backend answered), Service)
SCENARIOS = {
    "same-node": (FlowSpec("frontend-0", "cart-0", up=50_001, down=150_001), FE0, "shop/cart-0", None),
    "cross-node": (FlowSpec("frontend-0", "db-0", up=50_002, down=150_002), FE0, DB, None),
    "clusterip": (FlowSpec("frontend-1", "svc/payments", up=50_003, down=150_003), FE1, None, "payments"),
    "clusterip-v6": (FlowSpec("frontend-1", "svc/db", up=50_004, down=150_004, family=6), FE1, DB, "db"),
    "host-network": (FlowSpec("node-exporter-a", "db-0", up=50_005, down=150_005), "node-a", DB, None),
}


def name_of(peer: dict[str, Any]) -> str:
    if peer["kind"] == "pod":
        return f"{peer['namespace']}/{peer['name']}"
    if peer["kind"] == "node":
        return peer["name"]
    return peer["peer_class"]


@pytest.fixture(scope="module")
def api(kube_binaries: tuple[str, str]) -> Iterator[KubeAPI]:
    with KubeAPI(*kube_binaries) as k:
        yield k


@pytest.fixture(scope="module")
def setup(api: KubeAPI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, LabRegistrar, str]]:
    work = Path(tmp_path_factory.mktemp("k8s"))
    admin = KubeClient(kubeconfig_config(str(api.kubeconfig_path)))
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    api.create_namespace("otelflow")
    # the agents run under exactly the shipped RBAC: the manifests' own ServiceAccount, ClusterRole
    # (generated from RBAC_RULES) and ClusterRoleBinding
    sa, role, binding = (yaml.safe_load((MANIFESTS / f).read_text()) for f in SHIPPED_RBAC)
    assert role["rules"] == [dict(r) for r in RBAC_RULES]
    admin.request("POST", f"/api/v1/namespaces/{sa['metadata']['namespace']}/serviceaccounts", sa)
    admin.request("POST", f"{rbac}/clusterroles", role)
    admin.request("POST", f"{rbac}/clusterrolebindings", binding)
    token = api.create_service_account_token(sa["metadata"]["namespace"], sa["metadata"]["name"])
    with Lab(demo_topology()) as lab:
        reg = LabRegistrar(lab, admin)
        reg.register(skip_pods=LATE)  # registered only after the API server's outage
        with relays(lab, api.port):
            yield lab, reg, write_kubeconfig(api, token, work / "agent.kubeconfig")
    admin.close()


@pytest.fixture(scope="module")
def run(setup: tuple[Lab, LabRegistrar, str], api: KubeAPI) -> Iterator[dict[str, Any]]:
    lab, reg, kcfg = setup
    env = {
        "OTELFLOW_METADATA__KUBERNETES__ENABLED": "true",
        "OTELFLOW_METADATA__KUBERNETES__KUBECONFIG": kcfg,
    }
    out: dict[str, Any] = {}
    gen = TrafficGenerator(lab)
    with agents(lab, NODES, extra_env=env) as runs:
        out["scenarios"] = dict(zip(SCENARIOS, gen.run([s[0] for s in SCENARIOS.values()]), strict=True))
        # the same IP, another pod: a long flow runs from cart-0 while it is replaced
        long = gen.start([FlowSpec("cart-0", "db-0", up=300_000, down=300_000, duration=4.0)])
        time.sleep(1.5)
        reg.delete_pod("shop", "cart-0")
        cart_ips = [str(lab.topology.pod_ip("cart-0", f)) for f in lab.topology.families]
        reg.pod("cart-9", "shop", "node-a", cart_ips, "cart", "Deployment")
        time.sleep(2.0)  # the watch delivers the change
        [out["after_reuse"]] = gen.run([FlowSpec("cart-0", "db-0", up=1_000, down=2_000)])
        [out["long"]] = long.result(60)
        # the API server away for 60 s
        api.stop()
        time.sleep(5)
        [out["during_outage"]] = gen.run([FlowSpec("frontend-0", "db-0", up=3_000, down=4_000)])
        time.sleep(55)
        api.start()
        reg.lab_pod("payments-0")  # appears only after the restart
        deadline = time.monotonic() + 90
        named = False
        while time.monotonic() < deadline and not named:
            [r] = gen.run([FlowSpec("payments-0", "db-0", up=500, down=500)])
            time.sleep(1.5)
            recs = [x for run in runs.values() for x in run.flows_of(r)]
            named = bool(recs) and all(x["client"]["kind"] == "pod" for x in recs)
        out["converged"] = named
        time.sleep(1.0)
    out["runs"] = runs
    yield out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_named_by_the_api_server_and_counted_once(run: dict[str, Any], setup: Any, name: str) -> None:
    lab = setup[0]
    r = run["scenarios"][name]
    assert r.ok, r.error
    _, want_client, want_server, want_service = SCENARIOS[name]
    if want_server is None:
        want_server = f"{lab.topology.pod(r.server_endpoint).namespace}/{r.server_endpoint}"
        if r.server_endpoint in LATE:  # not in the API server yet: an address nobody owns
            want_server = "private"
    recs = [x for n in NODES for x in run["runs"][n].flows_of(r)]
    assert counted(recs) == truth(r)  # 0.0% error, counted once across the two agents
    for x in recs:
        # which record (a late one would say when it was first and last seen)
        keys = ("flow_id", "observer", "first_seen", "last_seen", "opened", "closed", "state", "bytes_c2s")
        which = {k: x.get(k) for k in keys}
        assert name_of(x["client"]) == want_client, (x["client"], which)
        assert name_of(x["server"]) == want_server, (x["server"], which)
        if want_service:
            assert x["service"] and x["service"].endswith(f"/{want_service}"), x["service"]
        if x["server"]["kind"] == "pod" and x["server"]["name"] not in LATE:
            pod = lab.topology.pod(x["server"]["name"])
            assert (
                x["server"]["workload_name"] == pod.workload
                and x["server"]["workload_kind"] == pod.workload_kind
            )
            assert x["server"]["zone"] == lab.topology.node(pod.node).zone


def test_ip_reused_by_another_pod_is_attributed_by_time(run: dict[str, Any]) -> None:
    runs = run["runs"]
    long_recs = [x for n in NODES for x in runs[n].flows_of(run["long"])]
    assert long_recs and {name_of(x["client"]) for x in long_recs} == {"shop/cart-0"}
    new_recs = [x for n in NODES for x in runs[n].flows_of(run["after_reuse"])]
    assert new_recs and {name_of(x["client"]) for x in new_recs} == {"shop/cart-9"}
    assert counted(long_recs) == truth(run["long"])


def test_api_server_outage_keeps_naming_and_converges(run: dict[str, Any]) -> None:
    runs = run["runs"]
    during = [x for n in NODES for x in runs[n].flows_of(run["during_outage"])]
    assert during and {name_of(x["client"]) for x in during} == {"shop/frontend-0"}
    assert counted(during) == truth(run["during_outage"])
    assert run["converged"], "a pod registered after the API server returned was never named"
    for r in runs.values():
        assert r.proc.returncode == 0, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
