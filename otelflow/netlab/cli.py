"""`otelflow netlab`: build, list and remove lab clusters by hand."""

from __future__ import annotations

import argparse
import sys

import yaml

from otelflow.netlab.topology import Topology, TopologyError, demo_topology, topology_from_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="netlab_command", metavar="ACTION")
    sub.required = True
    up = sub.add_parser("up", help="build a lab and leave it running")
    up.add_argument("-t", "--topology", metavar="FILE", help="topology YAML (default: the demo cluster)")
    up.add_argument("--id", dest="lab_id", help="lab id (default: random)")
    down = sub.add_parser("down", help="remove labs and everything in them")
    down.add_argument("lab_ids", nargs="*", metavar="ID", help="labs to remove (default: all)")
    sub.add_parser("list", help="list labs on this machine")
    show = sub.add_parser("show", help="print a topology's address plan without building it")
    show.add_argument("-t", "--topology", metavar="FILE", help="topology YAML (default: the demo cluster)")


def load_topology(path: str | None) -> Topology:
    if not path:
        return demo_topology()
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise TopologyError(f"topology: {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TopologyError(f"topology: {path}: malformed YAML: {str(e).splitlines()[0]}") from None
    return topology_from_dict(raw)


def describe(t: Topology, names: object | None = None) -> str:
    """A human-readable address plan: one line per endpoint and Service."""
    rows = []
    for node in t.nodes:
        v6 = f"  {t.node_ip(node.name, 6)}" if t.ipv6 else ""
        rows.append(f"node      {node.name:<20} {t.node_ip(node.name, 4)!s:<15}{v6}  zone={node.zone or '-'}")
    for p in t.pods:
        v6 = f"  {t.pod_ip(p.name, 6)}" if t.ipv6 else ""
        kind = "hostpod" if p.host_network else "pod"
        rows.append(
            f"{kind:<9} {p.namespace + '/' + p.name:<20} {t.pod_ip(p.name, 4)!s:<15}{v6}  node={p.node}"
        )
    for s in t.services:
        v6 = f"  {t.service_ip(s.name, 6)}" if t.ipv6 else ""
        rows.append(
            f"service   {s.namespace + '/' + s.name:<20} {t.service_ip(s.name, 4)!s:<15}{v6}  "
            f"{s.protocol}/{s.port}->{s.target_port} backends={','.join(s.backends)}"
        )
    for e in t.externals:
        v6 = f"  {t.external_ip(e.name, 6)}" if t.ipv6 else ""
        rows.append(f"external  {e.name:<20} {t.external_ip(e.name, 4)!s:<15}{v6}")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    from otelflow.netlab import ns as nsu
    from otelflow.netlab.lab import Lab, list_labs, remove_labs

    try:
        if args.netlab_command == "show":
            print(describe(load_topology(args.topology)))
            return 0
        nsu.require_root()
        if args.netlab_command == "list":
            labs = list_labs()
            if not labs:
                print("no labs")
            for lab_id, nss in sorted(labs.items()):
                print(f"{lab_id}  {len(nss)} namespaces  ({nss[0]} ...)")
            return 0
        if args.netlab_command == "down":
            ids = args.lab_ids or None
            found = list_labs()
            left = remove_labs(ids)
            gone = [i for i in (ids or list(found)) if i in found]
            print(f"removed {len(gone)} lab(s){': ' + ', '.join(gone) if gone else ''}")
            if left:
                print(f"otelflow netlab: could not remove {', '.join(left)}", file=sys.stderr)
                return 1
            return 0
        if args.netlab_command == "up":
            t = load_topology(args.topology)
            lab = Lab(t, args.lab_id)
            lab.up(progress=lambda m: print(f"  building {m} ...", file=sys.stderr))
            print(f"lab {lab.lab_id} is up; namespaces start with {lab.names.prefix}")
            print(describe(t))
            print(f"enter a pod:   ip netns exec {lab.names.prefix}pod-<name> bash")
            print(f"remove it:     otelflow netlab down {lab.lab_id}")
            return 0
    except (TopologyError, nsu.NetlabError) as e:
        print(f"otelflow netlab: {e}", file=sys.stderr)
        return 2 if isinstance(e, TopologyError) else 1
    return 2
