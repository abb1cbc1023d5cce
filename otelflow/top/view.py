"""What `otelflow top` draws: panes, sorting, filtering, help, as plain text lines with a style each
(the curses loop colours them; `--once` prints them). No terminal code here, so it is testable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from otelflow.top.model import Model

PANES = ("nodes", "workloads", "connections")
SORTS = ("bytes", "packets", "connections")
SORT_LABEL = {"bytes": "bytes/s", "packets": "packets/s", "connections": "connections"}
MARK_CROSS = "cross-zone"
MARK_EXT = "external"

HELP = """\
otelflow top: the cluster's network, live (each byte counted once, cluster-wide)

  1 / 2 / 3     panes: nodes, workloads (client -> server, Service), connections
  tab           next pane
  b  p  c       sort by bytes/s, packets/s, connections (descending)
  s             next sort key
  /             filter: terms separated by spaces, all must match:
                  ns:NAME     either end in this namespace
                  wl:NAME     either end is this workload (or pod, node, host)
                  port:N      the server port (or the port the client dialed)
                  node:NAME   either end runs on this node (nodes, connections)
                  TEXT        free text anywhere in the row
                an empty filter clears it; Esc cancels
  x             clear the filter
  h  ?          this help (any key closes it)
  q             quit

Rows marked cross-zone (yellow) cross availability zones; rows marked external (magenta) have an
end outside the cluster. Rates are per second over the agents' window.
"""


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class Filter:
    terms: tuple[tuple[str, str], ...] = ()
    text: str = ""

    @staticmethod
    def parse(text: str) -> Filter:
        terms: list[tuple[str, str]] = []
        for word in text.split():
            key, sep, val = word.partition(":")
            key = {"namespace": "ns", "workload": "wl"}.get(key, key)
            if sep and key in ("ns", "wl", "port", "node"):
                if not val:
                    raise FilterError(f"filter {word!r}: {key}: wants a value")
                if key == "port" and not val.isdigit():
                    raise FilterError(f"filter {word!r}: port wants a number")
                terms.append((key, val))
            else:
                terms.append(("text", word.lower()))
        return Filter(tuple(terms), " ".join(text.split()))

    def match(self, row: dict[str, Any], line: str) -> bool:
        ends = [row[e] for e in ("client", "server") if isinstance(row.get(e), dict)]
        for key, val in self.terms:
            if key == "ns":
                ok = any(e.get("namespace") == val for e in ends) or (
                    row.get("service", "").split("/")[0] == val
                )
            elif key == "wl":
                ok = any(val in (e.get("workload"), e.get("name")) for e in ends) or row.get("node") == val
            elif key == "port":
                ok = int(val) in (row.get("server_port"), row.get("dialed_port"))
            elif key == "node":
                ok = any(e.get("node") == val for e in ends) or row.get("node") == val
            else:
                ok = val in line.lower()
            if not ok:
                return False
        return True


@dataclass
class State:
    pane: str = "workloads"
    sort: str = "bytes"
    filter: Filter = field(default_factory=Filter)
    help: bool = False
    prompt: str | None = None  # the filter being typed, when the prompt is open
    message: str = ""  # one line, e.g. a filter error
    once: bool = False  # one frame (--once): nothing is retried


def rate(v: float, unit: str = "B") -> str:
    """Human rate, SI prefixes: 950 B/s, 1.2 kB/s, 3.40 MB/s."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            x = v / scale
            return f"{x:.2f} {prefix}{unit}/s" if x < 10 else f"{x:.1f} {prefix}{unit}/s"
    return f"{v:.0f} {unit}/s"


def pkts(v: float) -> str:
    return rate(v, "p")


def _note(row: dict[str, Any]) -> str:
    if row.get("external"):
        return MARK_EXT
    if row.get("cross_zone"):
        return MARK_CROSS
    return ""


def _cut(s: str, w: int) -> str:
    return s if len(s) <= w else s[: max(w - 1, 0)] + "~"


def _sort_value(pane: str, sort: str, row: dict[str, Any]) -> float:
    if sort == "connections":
        if pane == "connections":
            return 1.0 if row.get("open_counted") else 0.0
        return float(row.get("connections", 0))
    if pane == "nodes":
        return row["tx_bps"] + row["rx_bps"] if sort == "bytes" else row["tx_pps"] + row["rx_pps"]
    if sort == "bytes":
        return float(row["c2s_bps"] + row["s2c_bps"])
    return float(row["c2s_pps"] + row["s2c_pps"])


# (title, width, align) per column, and the row's cells
COLUMNS: dict[str, list[tuple[str, int, str]]] = {
    "nodes": [
        ("NODE", 18, "<"),
        ("ZONE", 10, "<"),
        ("SENT", 11, ">"),
        ("RECEIVED", 11, ">"),
        ("PKTS OUT", 10, ">"),
        ("PKTS IN", 10, ">"),
        ("X-ZONE OUT", 11, ">"),
        ("EXT OUT", 11, ">"),
        ("CONNS", 6, ">"),
        ("AGENT", 9, "<"),
    ],
    "workloads": [
        ("CLIENT", 24, "<"),
        ("SERVER", 24, "<"),
        ("SERVICE", 18, "<"),
        ("PORT", 9, "<"),
        ("C->S", 11, ">"),
        ("S->C", 11, ">"),
        ("PKTS", 10, ">"),
        ("CONNS", 6, ">"),
        ("NOTE", 10, "<"),
    ],
    "connections": [
        ("CLIENT", 20, "<"),
        ("CLIENT ADDR", 24, "<"),
        ("SERVER", 20, "<"),
        ("SERVER ADDR", 24, "<"),
        ("SERVICE", 16, "<"),
        ("C->S", 11, ">"),
        ("S->C", 11, ">"),
        ("PKTS", 10, ">"),
        ("NOTE", 10, "<"),
    ],
}


def _addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def cells(pane: str, row: dict[str, Any]) -> list[str]:
    if pane == "nodes":
        return [
            row["node"],
            row.get("zone", ""),
            rate(row["tx_bps"]),
            rate(row["rx_bps"]),
            pkts(row["tx_pps"]),
            pkts(row["rx_pps"]),
            rate(row["cross_zone_bps"]),
            rate(row["external_bps"]),
            str(row.get("connections", 0)),
            "ok" if row.get("agent") else "-",
        ]
    note = _note(row)
    both_p = pkts(row["c2s_pps"] + row["s2c_pps"])
    if pane == "workloads":
        return [
            row["client"]["label"],
            row["server"]["label"],
            row.get("service", ""),
            f"{row.get('server_port', '')}/{row.get('transport', '')}",
            rate(row["c2s_bps"]),
            rate(row["s2c_bps"]),
            both_p,
            str(row.get("connections", 0)),
            note,
        ]
    return [
        row["client"]["label"],
        _addr(row["client_ip"], row["client_port"]),
        row["server"]["label"],
        _addr(row["server_ip"], row["server_port"]),
        row.get("service", ""),
        rate(row["c2s_bps"]),
        rate(row["s2c_bps"]),
        both_p,
        note,
    ]


def format_row(pane: str, values: list[str]) -> str:
    out = []
    for (_, w, align), v in zip(COLUMNS[pane], values, strict=True):
        v = _cut(v, w)
        out.append(f"{v:<{w}}" if align == "<" else f"{v:>{w}}")
    return " ".join(out).rstrip()


def rows_of(model: Model, state: State) -> list[tuple[str, dict[str, Any]]]:
    """The pane's rows after filtering and sorting, each with its text line."""
    pane = state.pane
    src = {"nodes": model.nodes, "workloads": model.pairs, "connections": model.connections}[pane]
    out = []
    for r in src:
        line = format_row(pane, cells(pane, r))
        if state.filter.match(r, line):
            out.append((line, r))
    out.sort(key=lambda lr: (-_sort_value(pane, state.sort, lr[1]), lr[0]))
    return out


def _style(pane: str, row: dict[str, Any]) -> str:
    if pane == "nodes":
        return "normal"
    return {MARK_EXT: "external", MARK_CROSS: "cross"}.get(_note(row), "normal")


def frame(model: Model, state: State, width: int, height: int) -> list[tuple[str, str]]:
    """The whole screen as (text, style) lines; at most `height` lines, each at most `width` wide.
    Styles: title, tabs, header, normal, cross, external, status, error, prompt."""
    width = max(width, 20)
    t = model.totals
    ok = sum(1 for a in model.agents if a.ok)
    lines: list[tuple[str, str]] = []
    total_b = t.get("c2s_bps", 0.0) + t.get("s2c_bps", 0.0)
    total_p = t.get("c2s_pps", 0.0) + t.get("s2c_pps", 0.0)
    lines.append(
        (
            f"otelflow top  agents {ok}/{len(model.agents)}  window {model.window:g} s  "
            f"total {rate(total_b)}  {pkts(total_p)}  cross-zone {rate(t.get('cross_zone_bps', 0.0))}  "
            f"external {rate(t.get('external_bps', 0.0))}  connections {int(t.get('connections', 0))}",
            "title",
        )
    )
    tabs = "  ".join(f"[{i}:{p}]" if p == state.pane else f" {i}:{p} " for i, p in enumerate(PANES, 1))
    filt = state.filter.text or "-"
    lines.append((f"{tabs}    sort: {SORT_LABEL[state.sort]}    filter: {filt}    h: help  q: quit", "tabs"))
    if state.help:
        body = [(x, "normal") for x in HELP.splitlines()]
        lines += body[: max(height - 3, 0)]
    else:
        lines.append((format_row(state.pane, [c[0] for c in COLUMNS[state.pane]]), "header"))
        rows = rows_of(model, state)
        room = max(height - 4, 0)
        for line, r in rows[:room]:
            lines.append((line, _style(state.pane, r)))
        if not rows:
            lines.append(
                (
                    "(no traffic in the window" + (" matching the filter)" if state.filter.terms else ")"),
                    "normal",
                )
            )
    lines = lines[: max(height - 1, 0)]
    while len(lines) < height - 1:
        lines.append(("", "normal"))
    lines.append(_status(model, state))  # the status line always shows, even on one line
    return [(text[: width - 1], style) for text, style in lines]


def _status(model: Model, state: State) -> tuple[str, str]:
    if state.prompt is not None:
        return (f"filter: {state.prompt}", "prompt")
    if state.message:
        return (state.message, "error")
    bad = [a for a in model.agents if not a.ok]
    retry = "" if state.once else "; retrying"
    if model.problem:
        return (f"{model.problem}{retry}", "error")
    if not model.agents:
        return ("waiting for the first answer from the agents ...", "status")
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        return (f"unreachable: {bad[0].error}{more}{retry}", "error")
    capped = f"  {model.evicted} flows evicted at the agents' cap" if model.evicted else ""
    return (f"{model.connections_total} flows held by {len(model.agents)} agents{capped}", "status")


def text_frame(model: Model, state: State, width: int = 200, height: int = 60) -> str:
    """One frame as plain text (`top --once`): cross-zone and external rows keep their marker."""
    lines = [t for t, _ in frame(model, state, width, height)]
    while lines and not lines[-2 if len(lines) > 1 else -1].strip() and len(lines) > 1:
        lines.pop(-2)  # drop padding before the status line
    return "\n".join(lines)
