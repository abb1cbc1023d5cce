"""The interactive demo's bookkeeping: finished rounds are tallied and forgotten, so a demo left
open for hours keeps flat memory, and what a later round needs is never dropped."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from otelflow.demo import Tally, _forget_before
from otelflow.netlab.traffic import FlowResult, FlowSpec


def rec(port: int, ip: str = "10.244.1.2") -> dict[str, Any]:
    return {"client_port": port, "client_ip": ip, "transport": "tcp"}


def test_forget_keeps_only_later_rounds() -> None:
    runs = {"a": SimpleNamespace(records=[rec(20001), rec(20005), rec(20006), rec(40000, "127.0.0.1")])}
    _forget_before(cast(Any, runs), 20005)
    assert runs["a"].records == [rec(20006)]


def test_tally_sums_and_keeps_a_few_failures() -> None:
    t = Tally()
    spec = FlowSpec("a", "b", up=10, down=20)
    ok = FlowResult(spec, "10.0.0.1", 20001, "10.0.0.2", 80, up_l3_bytes=100, down_l3_bytes=50)
    ok.up_sent, ok.up_received, ok.down_sent, ok.down_received = 10, 10, 20, 20
    bad = [
        FlowResult(FlowSpec("a", "b"), "10.0.0.1", 20002 + i, "10.0.0.2", 80, error="timeout")
        for i in range(7)
    ]
    t.add([ok, *bad], 150)
    t.add([ok], 150)
    assert (t.flows, t.agent_bytes, t.truth_bytes, t.incomplete, len(t.bad)) == (9, 300, 300, 7, 5)
