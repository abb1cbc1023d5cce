"""The flow-delta record: what every flow source emits and every later stage consumes.

One record says what one flow did during one poll interval, as seen on one node. Roles come from the
connection, not from the packet: the client is the side that opened it (conntrack's original
direction); ``c2s`` counts bytes the client sent, ``s2c`` bytes the server sent.

Three views of the server side are kept because NAT changes them:
- ``dialed_*``: the address the client addressed (a Service ClusterIP, an external IP);
- ``server_*``: the address that answered (the backend pod behind a DNAT);
- ``client_nat_*``: the client as the server saw it (the node's address after masquerade).
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from typing import Any

TRANSPORTS = {
    6: "tcp",
    17: "udp",
    1: "icmp",
    58: "icmpv6",
    2: "igmp",
    4: "ipip",
    41: "ipv6",
    50: "esp",
    51: "ah",
    112: "vrrp",
    132: "sctp",
    136: "udplite",
    33: "dccp",
    47: "gre",
}


def transport_name(proto: int) -> str:
    return TRANSPORTS.get(proto, str(proto))


def family_number(af: int) -> int:
    return 4 if af == socket.AF_INET else 6


@dataclass(slots=True)
class FlowDelta:
    flow_id: str  # unique per flow instance for the agent's lifetime
    source: str  # "conntrack" | "ebpf"
    observer: str  # node that observed the flow (k8s.node.name)
    family: int  # 4 | 6
    transport: str  # "tcp", "udp", "icmp", ...
    client_ip: str
    client_port: int
    dialed_ip: str
    dialed_port: int
    server_ip: str
    server_port: int
    client_nat_ip: str
    client_nat_port: int
    dnat: bool
    snat: bool
    # counters added during this interval; None when the source has no counters (accounting off)
    bytes_c2s: int | None
    packets_c2s: int | None
    bytes_s2c: int | None
    packets_s2c: int | None
    opened: bool  # the flow started during this interval
    closed: bool  # the flow ended during this interval (reported once)
    state: str | None  # TCP state as conntrack names it, None for other transports
    first_seen: float  # unix seconds: when this agent first saw the flow
    last_seen: float  # unix seconds: the latest observation behind this record
    ct_id: int = 0
    zone: int = 0
    mark: int = 0
    # TCP health from the eBPF source's tracing programs, per direction (c2s: the client's socket
    # sending); None when the source has no such hook
    retransmits_c2s: int | None = None  # segments retransmitted
    retransmits_s2c: int | None = None
    resets_c2s: int | None = None  # RSTs sent
    resets_s2c: int | None = None
    rtt_us_c2s: int | None = None  # the sender's latest smoothed RTT this interval (µs); None: no sample
    rtt_us_s2c: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
