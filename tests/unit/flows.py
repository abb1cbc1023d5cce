"""Shared inputs of the export tests: two pods, an external peer, a Service, and a flow-delta factory
(a TCP flow from fe-1 through the Service's ClusterIP to be-7, opened this interval)."""

from __future__ import annotations

from typing import Any

from otelflow.flow import FlowDelta
from otelflow.meta.model import Peer, ServiceMeta

FE = Peer("pod", "pod", node="n1", zone="a", region="r", namespace="shop", name="fe-1", uid="u1",
          workload_name="fe", workload_kind="Deployment")  # fmt: skip
BE = Peer("pod", "pod", node="n2", zone="b", region="r", namespace="shop", name="be-7", uid="u2",
          workload_name="be", workload_kind="StatefulSet")  # fmt: skip
EXT = Peer("external", "public")
SVC = ServiceMeta("shop", "be", ("10.96.0.10",))


def delta(**kw: Any) -> FlowDelta:
    base: dict[str, Any] = dict(
        flow_id="1", source="conntrack", observer="n1", family=4, transport="tcp",
        client_ip="10.1.1.2", client_port=40000, dialed_ip="10.96.0.10", dialed_port=80,
        server_ip="10.1.2.3", server_port=8080, client_nat_ip="10.1.1.2", client_nat_port=40000,
        dnat=True, snat=False, bytes_c2s=100, packets_c2s=2, bytes_s2c=1000, packets_s2c=3,
        opened=True, closed=False, state="ESTABLISHED", first_seen=1.0, last_seen=2.0,
    )  # fmt: skip
    base.update(kw)
    return FlowDelta(**base)
