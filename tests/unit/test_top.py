"""`otelflow top` without a terminal: the merged view's panes, sorting, filtering, markers, help and
keys, every source failure as one status line, and `--once` against a served live view."""

from __future__ import annotations

import contextlib
import curses
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from otelflow.cli import main
from otelflow.live import LiveView
from otelflow.promexp import AgentHttpServer
from otelflow.top.model import Model, merge
from otelflow.top.sources import AgentResult, Fetcher, FetchError, HttpAgent, check_answer
from otelflow.top.tui import handle_key
from otelflow.top.view import Filter, FilterError, State, frame, rate, rows_of, text_frame
from tests.unit.test_live import CART, FRONTEND, INTERNET, PAYMENTS, SVC, Clock, delta, two_agents


def cluster() -> Model:
    a, b, clock = two_agents()
    clock.t = 102.0
    a.write([delta(CART, INTERNET, (3000, 30), (20000, 40), (True, True), client_port=40000)])
    a.write([delta(FRONTEND, CART, (50, 1), (60, 1), (True, True), client_port=40001)])
    a.write([delta(FRONTEND, CART, (50, 1), (60, 1), (True, True), client_port=40002)])
    clock.t = 105.0
    return merge([AgentResult("a", a.snapshot(), ""), AgentResult("b", b.snapshot(), "")])


def screen(model: Model, state: State, height: int = 40) -> str:
    return "\n".join(t for t, _ in frame(model, state, 200, height))


def test_workloads_pane_names_marks_and_sorts() -> None:
    m = cluster()
    rows = rows_of(m, State(pane="workloads", sort="bytes"))
    labels = [(r["client"]["label"], r["server"]["label"]) for _, r in rows]
    assert labels == [
        ("shop/cart", "[internet]"),  # 2,300 B/s
        ("shop/frontend", "shop/payments"),  # 600 B/s
        ("shop/frontend", "shop/cart"),  # 22 B/s
    ]
    text = screen(m, State())
    line = next(x for x in text.splitlines() if "shop/payments" in x and "shop/frontend" in x)
    assert "cross-zone" in line and "100 B/s" in line and "500 B/s" in line and "8080/tcp" in line
    assert "external" in next(x for x in text.splitlines() if "[internet]" in x)
    styles = {t.split()[0] + t.split()[1]: s for t, s in frame(m, State(), 200, 40) if t.startswith("shop/")}
    assert styles["shop/cart[internet]"] == "external" and styles["shop/frontendshop/payments"] == "cross"
    assert styles["shop/frontendshop/cart"] == "normal"
    by_conns = rows_of(m, State(pane="workloads", sort="connections"))
    assert by_conns[0][1]["server"]["label"] == "shop/cart" and by_conns[0][1]["connections"] == 2
    by_pkts = rows_of(m, State(pane="workloads", sort="packets"))
    assert [r["server"]["label"] for _, r in by_pkts][:2] == ["[internet]", "shop/payments"]


def test_filters() -> None:
    m = cluster()

    def servers(text: str) -> list[str]:
        return [r["server"]["label"] for _, r in rows_of(m, State(filter=Filter.parse(text)))]

    assert servers("port:8080") == ["[internet]", "shop/payments", "shop/cart"]  # all use 8080 here
    assert servers("wl:payments") == ["shop/payments"]
    assert servers("ns:shop") == ["[internet]", "shop/payments", "shop/cart"]
    assert servers("ns:data") == []
    assert servers("internet") == ["[internet]"]
    assert servers("wl:frontend cart") == ["shop/cart"]
    assert servers("node:node-b") == []  # a workload pair is no node's: see the connections pane
    on_b = rows_of(m, State(pane="connections", filter=Filter.parse("node:node-b")))
    assert [r["server"]["label"] for _, r in on_b] == ["shop/payments"]
    with pytest.raises(FilterError, match="port wants a number"):
        Filter.parse("port:http")
    assert "matching the filter" in screen(m, State(filter=Filter.parse("ns:nothing")))


def test_nodes_and_connections_panes() -> None:
    m = cluster()
    text = screen(m, State(pane="nodes"))
    a = next(x for x in text.splitlines() if x.startswith("node-a"))
    assert "zone-a" in a and "ok" in a
    # sent: frontend 100 B/s to payments + cart 300 to the internet + 10 + 12 between frontend and cart
    assert rate(422) in a and rate(300) in a and a.split()[-2] == "4"
    conns = rows_of(m, State(pane="connections"))
    assert len(conns) == 4
    line = next(t for t, r in conns if r["server"]["label"] == "shop/payments")
    assert "10.244.1.2:20001" in line and "10.244.2.3:8080" in line and "shop/payments" in line


def test_header_help_and_status() -> None:
    m = cluster()
    head = screen(m, State()).splitlines()
    assert head[0].startswith("otelflow top  agents 2/2  window 10 s  total 2.92 kB/s")
    assert "[2:workloads]" in head[1] and "sort: bytes/s" in head[1]
    assert "filter: -" in head[1]
    helped = screen(m, State(help=True))
    assert "sort by bytes/s, packets/s, connections" in helped and "q             quit" in helped
    down = merge([AgentResult("x:1", None, "x:1: Connection refused")])
    assert frame(down, State(), 120, 10)[-1] == ("unreachable: x:1: Connection refused; retrying", "error")
    # tiny terminals never break the layout
    for w, h in ((20, 3), (200, 2), (5, 1)):
        f = frame(m, State(), w, h)
        assert len(f) <= max(h, 1) and all(len(t) < max(w, 20) for t, _ in f)


def test_keys() -> None:
    s = State()
    for k, pane in ((ord("1"), "nodes"), (9, "workloads"), (ord("3"), "connections")):
        assert handle_key(s, k) and s.pane == pane
    for k, sort in ((ord("p"), "packets"), (ord("c"), "connections"), (ord("s"), "bytes")):
        handle_key(s, k)
        assert s.sort == sort
    handle_key(s, ord("/"))
    for ch in "wl:db port:5432":
        handle_key(s, ord(ch))
    handle_key(s, curses.KEY_BACKSPACE)
    assert s.prompt == "wl:db port:543"
    handle_key(s, 10)
    assert s.prompt is None and s.filter.terms == (("wl", "db"), ("port", "543"))
    handle_key(s, ord("/"))
    for ch in " port:x":
        handle_key(s, ord(ch))
    handle_key(s, 10)
    assert s.message == "filter 'port:x': port wants a number" and s.filter.text == "wl:db port:543"
    handle_key(s, ord("x"))
    assert s.filter.terms == () and s.message == ""
    handle_key(s, ord("h"))
    assert s.help
    assert handle_key(s, ord(" ")) and not s.help
    assert not handle_key(s, ord("q"))


def test_source_errors_are_one_line() -> None:
    with pytest.raises(FetchError, match=r"^a: no /api/v1/top here \(404\)"):
        check_answer("a", 404, b"not found\n")
    with pytest.raises(FetchError, match=r"^a: HTTP 500: boom$"):
        check_answer("a", 500, b"boom\nmore")
    with pytest.raises(FetchError, match="not JSON"):
        check_answer("a", 200, b"<html>")
    with pytest.raises(FetchError, match="API version 2, this top reads version 1"):
        check_answer("a", 200, b'{"version": 2}')
    with pytest.raises(ValueError, match="want http://HOST:PORT"):
        HttpAgent("ftp://x")
    srv = AgentHttpServer("127.0.0.1:0", lambda: "", lambda: True)
    port = srv.port
    srv.close()
    with pytest.raises(FetchError) as e:
        HttpAgent(f"127.0.0.1:{port}").fetch(10)
    assert str(e.value).startswith(f"127.0.0.1:{port}: ") and "\n" not in str(e.value)


@pytest.fixture
def served() -> Iterator[str]:
    clock = Clock(0.0)
    v = LiveView("node-a", clock=clock)
    clock.t = 10.0
    v.write([delta(FRONTEND, PAYMENTS, (1000, 10), (5000, 50), (True, True), service=SVC)])
    v.write([delta(CART, INTERNET, (100, 1), (200, 2), (True, True), client_port=40000)])
    srv = AgentHttpServer("127.0.0.1:0", lambda: "", lambda: True, v.snapshot)
    try:
        yield f"http://127.0.0.1:{srv.port}"
    finally:
        srv.close()


def test_once_prints_a_frame(served: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--agent", served, "--once"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("otelflow top  agents 1/1")
    assert "shop/frontend" in lines[3] and "shop/payments" in lines[3] and "cross-zone" in lines[3]
    assert "[internet]" in lines[4] and "external" in lines[4]
    assert main(["top", "--agent", served, "--once", "--pane", "nodes", "--filter", "node:node-b"]) == 0
    out = capsys.readouterr().out
    assert "node-b" in out and "\nnode-a" not in out


def test_cli_errors(served: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--agent", served, "--filter", "port:x", "--once"]) == 2
    assert capsys.readouterr().err == "otelflow top: filter 'port:x': port wants a number\n"
    assert main(["top", "--agent", "ftp://x", "--once"]) == 2
    assert "want http://HOST:PORT" in capsys.readouterr().err
    assert main(["top", "--agent", served]) == 2  # pytest's stdout is no terminal
    assert capsys.readouterr().err == "otelflow top: needs a terminal (use --once to print one frame)\n"


def test_once_with_a_dead_agent(capsys: pytest.CaptureFixture[str]) -> None:
    class NotAgent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAgent)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        assert main(["top", "--agent", url, "--once"]) == 1
        cap = capsys.readouterr()
        assert cap.err.strip().endswith("the answer is not JSON")
        assert "agents 0/1" in cap.out
    finally:
        srv.shutdown()
        srv.server_close()


def test_text_frame_has_no_padding() -> None:
    m = cluster()
    out = text_frame(m, State(), 200, 60)
    assert "\n\n" not in out


def test_a_hung_agent_does_not_hold_up_the_others(served: str) -> None:
    """An agent that accepts and never answers: the refresh reports it as still waiting and shows
    the others; its request is not sent again while the first one runs."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(lsock.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    hung = HttpAgent(f"127.0.0.1:{lsock.getsockname()[1]}")
    f = Fetcher([HttpAgent(served), hung], wait=0.3)
    try:
        first, _ = f.fetch(10)
        second, _ = f.fetch(10)
        for results in (first, second):
            assert results[0].data is not None and results[0].data["node"] == "node-a"
            assert results[1].data is None and results[1].error.endswith("still waiting")
        deadline = time.monotonic() + 10  # the accept thread may lag on a busy machine
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(accepted) == 1  # one request in flight, never a second
    finally:
        lsock.close()
        for s in accepted:
            s.close()  # the in-flight request ends (the server went away)
        f.close()
