"""Count every byte once, cluster-wide, with no query-time dedup.

A byte is counted at the node of the pod that **sent** it, or, when the sender is outside the
cluster, at the node of the pod that **received** it. Each agent knows its own node (downward API)
and keeps only the directions it owns; a connection is counted where its client-to-server bytes are.

Worked example (two nodes; frontend on node-a calls the payments Service, backend on node-b):
both nodes' conntrack see the flow. node-a owns client->server (frontend sent it) and drops
server->client; node-b owns server->client (the backend sent it) and drops client->server. Summing
over both agents gives each byte once. A pod calling an external API: only its node sees it and owns
both directions (the external sender's bytes are owned by the receiving pod's node). Traffic from
an external client to a pod: owned by the pod's node, both ways.

Host-network senders count as their node. Ownership looks at the client **as the other nodes see
it**: when this node SNATs the client (masquerade, NodePort with externalTrafficPolicy: Cluster),
the next node sees this node's address as the client, so both decide with that address and agree.
The client's *name* in the record stays the original client.
"""

from __future__ import annotations

from otelflow.meta.model import Peer


def owner(sender: Peer, receiver: Peer, observer: str) -> str:
    """The node that counts bytes going from `sender` to `receiver`."""
    if sender.in_cluster and sender.node:
        return sender.node
    if receiver.in_cluster and receiver.node:
        return receiver.node
    return observer  # neither end in the cluster (transit traffic): count where it was seen


class CountOnce:
    """Decides, for one node, which directions of a flow it reports."""

    def __init__(self, node: str) -> None:
        self.node = node

    def owns(self, client: Peer, server: Peer, observer: str) -> tuple[bool, bool]:
        """(counts client->server, counts server->client) on this node; `client` as seen after SNAT."""
        return owner(client, server, observer) == self.node, owner(server, client, observer) == self.node
