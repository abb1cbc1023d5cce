"""The static inventory: names for addresses without Kubernetes (hosts outside the cluster, the demo).

YAML, every section optional::

    nodes:    [{name: node-a, ips: [10.100.0.11, fd00:100::11], zone: zone-a, region: eu}]
    pods:     [{namespace: shop, name: web-0, node: node-a, ips: [10.244.1.2], uid: ..., workload: web,
                workload_kind: Deployment, host_network: false, host_ports: []}]
    services: [{namespace: shop, name: web, ips: [10.96.0.10], ports: [{port: 80, target_port: 8080,
                protocol: tcp}], backends: [shop/web-0]}]
    hosts:    [{name: billing-db, ips: [192.0.2.7], namespace: legacy, workload: billing, zone: dc1}]
    networks: [{name: office, cidrs: [198.51.100.0/24]}]   # named CIDR groups for unknown peers

Errors name the entry and the key, on one line (``InventoryError``).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml

from otelflow.meta.index import CidrGroups, IpIndex
from otelflow.meta.model import HostMeta, NodeMeta, PodMeta, ServiceMeta, ServicePort

_KEYS = {
    "nodes": {"name", "ips", "zone", "region"},
    "pods": {
        "namespace",
        "name",
        "node",
        "ips",
        "uid",
        "workload",
        "workload_kind",
        "host_network",
        "host_ports",
    },
    "services": {"namespace", "name", "ips", "ports", "backends"},
    "hosts": {"name", "ips", "namespace", "workload", "workload_kind", "zone", "region"},
    "networks": {"name", "cidrs"},
}


class InventoryError(ValueError):
    pass


def _ips(where: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise InventoryError(f"{where}.ips: expected a non-empty list of addresses")
    out = []
    for a in v:
        try:
            out.append(str(ipaddress.ip_address(str(a))))
        except ValueError:
            raise InventoryError(f"{where}.ips: {a!r} is not an IP address") from None
    return tuple(out)


def _str(where: str, d: dict[str, Any], key: str, required: bool = False) -> str:
    v = d.get(key, "")
    if required and not v:
        raise InventoryError(f"{where}.{key}: required")
    if not isinstance(v, str):
        raise InventoryError(f"{where}.{key}: expected a string")
    return v


def load_inventory(data: Any, source: str = "inventory") -> tuple[list[Any], CidrGroups]:
    """Parse inventory data into metadata records and CIDR groups."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InventoryError(f"{source}: expected a mapping at the top level")
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise InventoryError(f"{source}: unknown section {sorted(unknown)[0]!r}")
    records: list[Any] = []
    groups = CidrGroups()
    for section, keys in _KEYS.items():
        items = data.get(section) or []
        if not isinstance(items, list):
            raise InventoryError(f"{source}: {section}: expected a list")
        for i, d in enumerate(items):
            where = f"{source}: {section}[{i}]"
            if not isinstance(d, dict):
                raise InventoryError(f"{where}: expected a mapping")
            bad = set(d) - keys
            if bad:
                raise InventoryError(f"{where}: unknown key {sorted(bad)[0]!r}")
            name = _str(where, d, "name", required=True)
            if section == "nodes":
                records.append(
                    NodeMeta(
                        name, _ips(where, d.get("ips")), _str(where, d, "zone"), _str(where, d, "region")
                    )
                )
            elif section == "pods":
                hn = d.get("host_network", False)
                ports = d.get("host_ports", [])
                if (
                    not isinstance(hn, bool)
                    or not isinstance(ports, list)
                    or not all(isinstance(p, int) for p in ports)
                ):
                    raise InventoryError(
                        f"{where}: host_network must be a bool and host_ports a list of ints"
                    )
                records.append(
                    PodMeta(
                        namespace=_str(where, d, "namespace") or "default",
                        name=name,
                        node=_str(where, d, "node", required=True),
                        ips=_ips(where, d.get("ips")) if not hn or d.get("ips") else (),
                        uid=_str(where, d, "uid"),
                        workload_name=_str(where, d, "workload"),
                        workload_kind=_str(where, d, "workload_kind"),
                        host_network=hn,
                        host_ports=tuple(ports),
                    )
                )
            elif section == "services":
                ports_raw = d.get("ports", [])
                if not isinstance(ports_raw, list):
                    raise InventoryError(f"{where}.ports: expected a list")
                sp = []
                for p in ports_raw:
                    if not isinstance(p, dict) or not isinstance(p.get("port"), int):
                        raise InventoryError(f"{where}.ports: each needs an integer port")
                    sp.append(
                        ServicePort(
                            p["port"], int(p.get("target_port", p["port"])), str(p.get("protocol", "tcp"))
                        )
                    )
                backends = d.get("backends", [])
                records.append(
                    ServiceMeta(
                        _str(where, d, "namespace") or "default",
                        name,
                        _ips(where, d.get("ips")),
                        tuple(sp),
                        tuple(str(b) for b in backends),
                    )
                )
            elif section == "hosts":
                records.append(
                    HostMeta(
                        name,
                        _ips(where, d.get("ips")),
                        _str(where, d, "namespace"),
                        _str(where, d, "workload"),
                        _str(where, d, "workload_kind"),
                        _str(where, d, "zone"),
                        _str(where, d, "region"),
                    )
                )
            else:
                cidrs = d.get("cidrs")
                if not isinstance(cidrs, list) or not cidrs:
                    raise InventoryError(f"{where}.cidrs: expected a non-empty list")
                for c in cidrs:
                    try:
                        groups.add(name, str(c))
                    except ValueError:
                        raise InventoryError(f"{where}.cidrs: {c!r} is not a CIDR") from None
    return records, groups


def load_inventory_file(path: str) -> tuple[list[Any], CidrGroups]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise InventoryError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InventoryError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    return load_inventory(data, path)


def build_index(records: list[Any], groups: CidrGroups, index: IpIndex | None = None) -> IpIndex:
    """Feed records into an index (nodes first, so host-network pods find their node's IPs)."""
    if index is None:
        idx = IpIndex(groups)
    else:  # (an empty index is falsy: it has a length)
        idx = index
        idx.groups = groups
    order = {NodeMeta: 0, PodMeta: 1, ServiceMeta: 2, HostMeta: 3}
    for r in sorted(records, key=lambda r: order[type(r)]):
        if isinstance(r, NodeMeta):
            idx.upsert_node(r, now=0.0)
        elif isinstance(r, PodMeta):
            idx.upsert_pod(r, now=0.0)
        elif isinstance(r, ServiceMeta):
            idx.upsert_service(r, now=0.0)
        else:
            idx.upsert_host(r, now=0.0)
    return idx
