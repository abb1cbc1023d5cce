"""A flow is named by whoever owned the address at its first-seen time: an owner that appeared later
(a pod created after the flow began, at the address the flow went to) never names it, however late
the flow's records are decorated (the eBPF/conntrack sources emit a TCP flow's closing record when
conntrack forgets it, after TIME_WAIT: minutes after the flow's last byte)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from otelflow.countonce import CountOnce
from otelflow.decorate import Decorator
from otelflow.flow import FlowDelta
from otelflow.k8s.cache import MetadataStore, created_at
from otelflow.meta.index import IpIndex

T0 = 1_700_000_000.0  # the flow's first packet
FE_IP, BACKEND_IP, SVC_IP = "10.244.2.5", "10.244.2.7", "10.96.0.20"


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # as the API server writes it


def pod(name: str, ip: str, created: float | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop", "uid": f"uid-{name}"}
    if created is not None:
        meta["creationTimestamp"] = stamp(created)
    return {
        "metadata": meta,
        "spec": {"nodeName": "node-b", "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def flow(first_seen: float, closed: bool = False) -> FlowDelta:
    return FlowDelta(
        flow_id="e-1", source="ebpf", observer="node-b", family=4, transport="tcp",
        client_ip=FE_IP, client_port=40000, dialed_ip=SVC_IP, dialed_port=80,
        server_ip=BACKEND_IP, server_port=8080, client_nat_ip=FE_IP, client_nat_port=40000,
        dnat=True, snat=False, bytes_c2s=0 if closed else 100, packets_c2s=0 if closed else 1,
        bytes_s2c=0 if closed else 200, packets_s2c=0 if closed else 1, opened=not closed,
        closed=closed, state="TIME_WAIT" if closed else "ESTABLISHED",
        first_seen=first_seen, last_seen=first_seen + 0.2,
    )  # fmt: skip


def lab(clock: list[float]) -> tuple[MetadataStore, Decorator]:
    store = MetadataStore(IpIndex(history=300, clock=lambda: clock[0]))
    node = {
        "metadata": {"name": "node-b", "creationTimestamp": stamp(T0 - 3600)},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]},
    }
    store.apply("nodes", "ADDED", node)
    store.apply("pods", "ADDED", pod("frontend-1", FE_IP, T0 - 600))
    return store, Decorator(store.index, CountOnce("node-b"))


def test_a_pod_created_after_the_flow_began_does_not_name_its_closing_record() -> None:
    """The e2e failure (test_k8s_agents, clusterip): the backend was registered ~70 s after the flow,
    and the flow's closing record, decorated after that, named it."""
    clock = [T0 + 1.0]
    store, dec = lab(clock)
    first = dec.decorate(flow(T0))
    assert (first.client.name, first.server.kind, first.server.peer_class) == (
        "frontend-1",
        "external",
        "private",
    )
    clock[0] = T0 + 71.0  # the watch delivers the new pod, created at T0 + 70
    store.apply("pods", "ADDED", pod("payments-0", BACKEND_IP, T0 + 70))
    clock[0] = T0 + 121.0  # conntrack forgets the TIME_WAIT entry: the closing record
    last = dec.decorate(flow(T0, closed=True))
    assert (last.server.kind, last.server.peer_class, last.server.name) == ("external", "private", "")
    assert last.client.name == "frontend-1"
    # a flow that began after the pod was created is the pod's
    later = dec.decorate(flow(T0 + 80))
    assert (later.server.kind, later.server.name) == ("pod", "payments-0")


def test_creation_time_is_whole_seconds_and_the_index_trusts_it_not_the_watch() -> None:
    clock = [T0 + 30.0]  # the watch (or a relist) delivers the pod long after it was created
    store, _ = lab(clock)
    store.apply("pods", "ADDED", pod("payments-0", BACKEND_IP, T0 + 10.0))
    idx = store.index
    assert idx.resolve(BACKEND_IP, at=T0 + 9.5).peer_class == "private"  # before its creation
    assert idx.resolve(BACKEND_IP, at=T0 + 10.0).name == "payments-0"  # since its creation ...
    assert idx.resolve(BACKEND_IP, at=T0 + 20.0).name == "payments-0"  # ... not since the watch saw it


def test_a_reused_address_goes_to_the_new_pod_only_after_the_old_one_let_go() -> None:
    """The replacement was created (T0+5) before the old pod's release was seen (T0+8): flows up to
    the release are the old pod's."""
    clock = [T0]
    store, _ = lab(clock)
    store.apply("pods", "ADDED", pod("cart-0", BACKEND_IP, T0 - 100))
    clock[0] = T0 + 8.0
    store.apply("pods", "DELETED", pod("cart-0", BACKEND_IP, T0 - 100))
    clock[0] = T0 + 9.0
    store.apply("pods", "ADDED", pod("cart-9", BACKEND_IP, T0 + 5.0))
    idx = store.index
    assert idx.resolve(BACKEND_IP, at=T0 - 50).name == "cart-0"
    assert idx.resolve(BACKEND_IP, at=T0 + 6.0).name == "cart-0"
    assert idx.resolve(BACKEND_IP, at=T0 + 8.0).name == "cart-9"
    assert idx.resolve(BACKEND_IP, at=T0 - 200).peer_class == "private"  # before either existed


def test_a_creation_time_ahead_of_this_clock_counts_from_now() -> None:
    """The API server's clock ahead of this node's: the pod owns its address from when the index
    learnt of it, not from a moment that has not come yet here."""
    clock = [T0]
    store, _ = lab(clock)
    store.apply("pods", "ADDED", pod("payments-0", BACKEND_IP, T0 + 5.0))
    assert store.index.resolve(BACKEND_IP, at=T0 + 1.0).name == "payments-0"
    assert store.index.resolve(BACKEND_IP, at=T0 - 1.0).peer_class == "private"


def test_without_a_creation_time_the_first_owner_owns_the_address_from_the_start() -> None:
    """No creationTimestamp (the static inventory; an object without one): the first owner of an
    address names every flow to it; a later owner only from when the index learnt of it."""
    clock = [T0]
    store, _ = lab(clock)
    store.apply("pods", "ADDED", pod("old", BACKEND_IP, None))
    assert store.index.resolve(BACKEND_IP, at=T0 - 10_000).name == "old"
    clock[0] = T0 + 10.0
    store.apply("pods", "DELETED", pod("old", BACKEND_IP, None))
    clock[0] = T0 + 20.0
    store.apply("pods", "ADDED", pod("new", BACKEND_IP, None))
    assert store.index.resolve(BACKEND_IP, at=T0 + 15.0).name == "old"  # released 5 s before: history
    assert store.index.resolve(BACKEND_IP, at=T0 + 20.0).name == "new"


def test_created_at() -> None:
    assert created_at({"metadata": {"creationTimestamp": "2023-11-14T22:13:20Z"}}) == T0
    assert created_at({"metadata": {"creationTimestamp": "2023-11-14T22:13:20.5+00:00"}}) == T0 + 0.5
    assert created_at({"metadata": {}}) is None
    assert created_at({}) is None
    assert created_at({"metadata": {"creationTimestamp": "yesterday"}}) is None
    assert created_at({"metadata": {"creationTimestamp": "2023-11-14T22:13:20"}}) is None  # no zone
    assert created_at({"metadata": {"creationTimestamp": 1700000000}}) is None
