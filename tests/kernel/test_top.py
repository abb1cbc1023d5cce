"""`otelflow top` on a real lab: two agents on two nodes serve their live views; known traffic;
the JSON API agrees with the kernel's truth counters to the byte (each byte once across agents), and
`top` itself, driven through tmux, shows the named workloads, the Service, the external and
cross-zone markers, sorts and filters as asked, shows help, reports a dead agent, and quits."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from otelflow.netlab.agents import agents
from otelflow.netlab.lab import Lab
from otelflow.netlab.topology import demo_topology
from otelflow.netlab.traffic import FlowResult, FlowSpec, TrafficGenerator
from otelflow.top.sources import NetnsAgent

NODES = ["node-a", "node-b"]
PORT = 9465


class Tmux:
    """A private tmux server (own socket) running one command in a 200x50 window."""

    def __init__(self, command: str) -> None:
        self.sock = f"ofl-top-{secrets.token_hex(3)}"
        self.run("new-session", "-d", "-s", "top", "-x", "200", "-y", "50", command)

    def run(self, *args: str) -> str:
        p = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def wait_for(self, ok: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen()
            if ok(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {what}:\n{s}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return (
            subprocess.run(
                ["tmux", "-L", self.sock, "has-session", "-t", "top"], capture_output=True
            ).returncode
            == 0
        )

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)
        tmpdir = os.environ.get("TMUX_TMPDIR") or "/tmp"
        with contextlib.suppress(OSError):  # the server leaves its socket file behind
            os.unlink(os.path.join(tmpdir, f"tmux-{os.getuid()}", self.sock))


def rows(screen: str) -> list[str]:
    """The data rows of the pane (below the column header, above the status line)."""
    lines = screen.rstrip("\n").splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith(("CLIENT", "NODE")))
    return [x for x in lines[head + 1 : -1] if x.strip()]


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, list[FlowResult], Any]]:
    topo = demo_topology()
    with Lab(topo) as lab:
        inv = lab.write_inventory(str(Path(tmp_path_factory.mktemp("inv")) / "inventory.yaml"))
        env = {
            n: {"OTELFLOW_API__LISTEN": f"{topo.node_ip(n, 4)}:{PORT}", "OTELFLOW_API__TOP_WINDOW": "1h"}
            for n in NODES
        }
        with agents(lab, NODES, poll=0.5, inventory=inv, node_env=env) as runs:
            # four slow connections frontend-1 (node-b) -> cart-0 (node-a): open while top looks
            slow = TrafficGenerator(lab, timeout=300).start(
                [
                    FlowSpec("frontend-1", "cart-0", up=20_000, down=20_000, duration=60.0, port=7777)
                    for _ in range(4)
                ]
            )
            done = TrafficGenerator(lab).run(
                [
                    # cross-zone through a Service: payments-1 (node-a, zone-a) -> data/db (db-0, node-b)
                    FlowSpec("payments-1", "svc/db", up=100_000, down=3_000_000),
                    # external: cart-0 (node-a) -> the internet
                    FlowSpec("cart-0", "internet", up=20_000, down=400_000),
                ]
            )
            assert all(r.ok for r in done), [r.error for r in done]
            yield lab, done, runs
        slow.result(timeout=300)


def agent_views(lab: Lab) -> list[dict[str, Any]]:
    t = lab.topology
    return [NetnsAgent(lab.node_netns(n), str(t.node_ip(n, 4)), PORT).fetch(1000) for n in NODES]


def counted_bytes(views: list[dict[str, Any]], r: FlowResult) -> tuple[int, int]:
    """Bytes of one flow over both agents' answers, each agent's rate times its own span."""
    up = down = 0
    for v in views:
        for c in v["connections"]:
            if c["client_port"] == r.client_port and c["transport"] == r.spec.proto:
                up += round(c["c2s_bps"] * v["span_seconds"])
                down += round(c["s2c_bps"] * v["span_seconds"])
    return up, down


def test_api_is_exact_and_counts_once(lab_run: tuple[Lab, list[FlowResult], Any]) -> None:
    lab, done, _ = lab_run
    want = [(r.up_l3_bytes, r.down_l3_bytes) for r in done]
    deadline = time.monotonic() + 30  # the agents' next poll (bounded wait for a condition)
    while True:
        views = agent_views(lab)
        got = [counted_bytes(views, r) for r in done]
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == want
    pairs = [p for v in views for p in v["pairs"] if p["service"] == "data/db"]
    # the db flow crosses nodes: node-a counts the client's bytes, node-b the server's
    assert {
        (v["node"], p["c2s_bps"] > 0, p["s2c_bps"] > 0) for v in views for p in v["pairs"] if p in pairs
    } == {
        ("node-a", True, False),
        ("node-b", False, True),
    }
    assert all(p["cross_zone"] for p in pairs)
    assert sum(p["connections"] for p in pairs) == 0  # closed


def test_top_in_tmux(lab_run: tuple[Lab, list[FlowResult], Any], tmp_path: Path) -> None:
    lab, _, _ = lab_run
    t = lab.topology
    urls = [f"http://{t.node_ip(n, 4)}:{PORT}" for n in NODES] + [f"http://{t.node_ip('node-a', 4)}:9"]
    rc_file = tmp_path / "rc"
    top = [sys.executable, "-m", "otelflow", "top", "--interval", "0.5"]
    for u in urls:
        top += ["--agent", u]
    inner = f"ip netns exec {lab.node_netns('node-a')} {shlex.join(top)}; echo $? > {rc_file}"
    env = f"env -u LINES -u COLUMNS TERM=xterm-256color PATH={shlex.quote(os.environ.get('PATH', ''))}"
    tm = Tmux(f"{env} sh -c {shlex.quote(inner)}")
    try:
        s = tm.wait_for(lambda s: "data/db" in s and "[internet]" in s, "the lab's workloads")
        assert "agents 2/3" in s.splitlines()[0]
        assert (
            s.rstrip("\n").splitlines()[-1] == "unreachable: 10.100.0.11:9: Connection refused; retrying"
        ), s
        by_bytes = rows(s)
        db = next(x for x in by_bytes if "data/db" in x)
        assert db.startswith("shop/payments") and "cross-zone" in db and "5432/tcp" in db
        ext = next(x for x in by_bytes if "[internet]" in x)
        assert ext.startswith("shop/cart") and "external" in ext
        assert by_bytes[0] == db  # the busiest pair first (3.1 MB moved)

        tm.keys("c")  # sort by connections: the four open slow flows first
        s = tm.wait_for(lambda s: "sort: connections" in s, "the connections sort")
        first = rows(s)[0].split()
        assert first[:2] == ["shop/frontend", "shop/cart"] and first[-1] == "cross-zone"

        tm.keys("/", "ns:data", "Enter")  # filter: only rows with an end in namespace data
        # the tabs line names the applied filter (the prompt line shows it while it is typed)
        s = tm.wait_for(lambda s: "filter: ns:data    h: help" in s, "the filter")
        assert [x.split()[1] for x in rows(s)] == ["data/db"]
        tm.keys(
            "/", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "BSpace", "port:7777", "Enter"
        )
        s = tm.wait_for(lambda s: "filter: port:7777    h: help" in s, "the port filter")
        assert [x.split()[:3] for x in rows(s)] == [["shop/frontend", "shop/cart", "7777/tcp"]]
        tm.keys("x")

        tm.keys("1")  # nodes pane
        s = tm.wait_for(lambda s: "[1:nodes]" in s, "the nodes pane")
        # still sorted by connections: node-b's frontend-1 opened the four open ones
        assert [x.split()[:2] for x in rows(s)] == [["node-b", "zone-b"], ["node-a", "zone-a"]]
        assert rows(s)[0].split()[-2:] == ["4", "ok"]
        tm.keys("b")
        s = tm.wait_for(lambda s: "sort: bytes/s" in s, "the bytes sort")
        assert [x.split()[0] for x in rows(s)] == ["node-a", "node-b"]  # payments-1 and cart sent most
        tm.keys("3")  # connections pane: addresses
        s = tm.wait_for(lambda s: "[3:connections]" in s, "the connections pane")
        assert any("10.244." in x and "data/db" in x for x in rows(s))

        tm.run("resize-window", "-t", "top", "-x", "100", "-y", "20")  # the terminal shrinks
        s = tm.wait_for(lambda s: len(s.splitlines()) == 20, "the resized screen")
        assert max(len(x) for x in s.splitlines()) <= 100
        assert s.rstrip("\n").splitlines()[-1].startswith("unreachable: ")  # status still at the bottom
        tm.run("resize-window", "-t", "top", "-x", "200", "-y", "50")

        tm.keys("h")
        s = tm.wait_for(lambda s: "sort by bytes/s, packets/s, connections" in s, "the help")
        tm.keys("Space")
        tm.wait_for(lambda s: "CLIENT" in s, "the pane after help")

        tm.keys("q")
        deadline = time.monotonic() + 20
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rc_file.read_text().strip() == "0"
    finally:
        tm.close()
