"""Conntrack access for otelflow: the project's own ctnetlink (netfilter netlink) client.

`otelflow.conntrack.netlink` talks to the kernel directly over an AF_NETLINK / NETLINK_NETFILTER socket:
full-table dumps (never the counter-zeroing variant) and NEW/DESTROY event subscriptions.
"""

from otelflow.conntrack.netlink import (
    CtEntry,
    CtEvent,
    CtNetlinkError,
    CtTuple,
    EventSocket,
    ParseStats,
    dump,
    parse_messages,
)

__all__ = [
    "CtEntry",
    "CtEvent",
    "CtNetlinkError",
    "CtTuple",
    "EventSocket",
    "ParseStats",
    "dump",
    "parse_messages",
]
