"""Read a namespace's conntrack table through the `conntrack` command-line tool.

netlab uses the distribution's tool on purpose: it is the yardstick the project's own ctnetlink
parser is measured against, so it must not share code with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from otelflow.netlab import ns as nsu

_TUPLE_KEYS = ("src", "dst", "sport", "dport", "type", "code", "id", "packets", "bytes")


@dataclass(slots=True)
class CtRow:
    family: str  # "ipv4" | "ipv6"
    proto: str  # "tcp" | "udp" | "icmp" | ...
    timeout: int
    state: str  # TCP state, "" otherwise
    orig: dict[str, str] = field(default_factory=dict)
    reply: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)  # ASSURED, UNREPLIED, ...
    extra: dict[str, str] = field(default_factory=dict)  # mark, zone, use, id, ...

    def count(self, direction: str, what: str) -> int:
        """packets or bytes of "orig" or "reply" (0 when accounting is off)."""
        return int((self.orig if direction == "orig" else self.reply).get(what, 0))


def parse_line(line: str) -> CtRow | None:
    toks = line.split()
    if len(toks) < 5 or toks[0] not in ("ipv4", "ipv6"):
        return None
    row = CtRow(family=toks[0], proto=toks[2], timeout=int(toks[4]), state="")
    i = 5
    if i < len(toks) and "=" not in toks[i] and not toks[i].startswith("["):
        row.state = toks[i]
        i += 1
    cur = row.orig
    for tok in toks[i:]:
        if tok.startswith("[") and tok.endswith("]"):
            row.flags.add(tok[1:-1])
            continue
        if "=" not in tok:
            continue
        k, v = tok.split("=", 1)
        if k == "id" and not ("code" in cur and "id" not in cur and "packets" not in cur):
            row.extra["id"] = v  # the conntrack id, not an ICMP echo id
        elif k in _TUPLE_KEYS:
            if k in cur:  # a key seen twice starts the reply tuple
                cur = row.reply
            cur[k] = v
        else:
            row.extra[k] = v
    return row


def conntrack_rows(netns: str, *args: str) -> list[CtRow]:
    """`conntrack -L -o extended,id [args]` in a namespace, parsed."""
    out = nsu.ns_run(netns, ["conntrack", "-L", "-o", "extended,id", *args], check=False)
    rows = (parse_line(ln) for ln in out.splitlines())
    return [r for r in rows if r is not None]
