"""The live view's evictions (open connections dropped at api.top_max_connections) are on /metrics
as otelflow_agent_top_evicted_total, exact, and 0 when the agent serves no live view."""

from __future__ import annotations

from types import SimpleNamespace

from otelflow.agent import make_export
from otelflow.config import Config
from otelflow.live import LiveView
from otelflow.selfmetrics import SelfMetrics
from tests.unit.test_live import CART, INTERNET, Clock, delta

# SelfMetrics reads only `name` and `stats` of the flow source; the real sources need the kernel
# (tests/kernel covers them), so a plain namespace with a conntrack source's name stands in here.
SOURCE = SimpleNamespace(name="conntrack", stats=None)


def evicted_line(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("otelflow_agent_top_evicted_total")]


def test_evictions_are_counted_on_metrics() -> None:
    clock = Clock(0.0)
    live = LiveView("node-a", window=10.0, max_connections=2, clock=clock)
    selfm = SelfMetrics(SOURCE, make_export(Config(), []), lambda: 0, live=live)
    assert evicted_line(selfm.render()) == ["otelflow_agent_top_evicted_total 0"]
    for i, port in enumerate((30001, 30002, 30003, 30004, 30005)):
        clock.t = 1.0 + i
        live.write([delta(CART, INTERNET, (100, 1), (0, 0), (True, True), flow_id=str(i), client_port=port)])
    assert live.snapshot()["stats"]["evicted"] == 3
    assert evicted_line(selfm.render()) == ["otelflow_agent_top_evicted_total 3"]
    assert "# TYPE otelflow_agent_top_evicted_total counter" in selfm.render()


def test_no_live_view_reports_zero() -> None:
    selfm = SelfMetrics(SOURCE, make_export(Config(), []), lambda: 0)
    assert evicted_line(selfm.render()) == ["otelflow_agent_top_evicted_total 0"]
