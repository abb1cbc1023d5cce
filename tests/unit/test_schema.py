"""docs/telemetry.md is generated from otelflow/schema.py and must not drift; names follow the rules."""

from __future__ import annotations

from pathlib import Path

from otelflow.aggregate import Aggregator
from otelflow.schema import METRICS, SELF_METRICS, markdown, metric_attribute_names
from otelflow.selfmetrics import otel_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


def test_docs_are_generated_from_the_schema() -> None:
    assert DOC.read_text() == markdown(), "run: python -m otelflow.schema > docs/telemetry.md"


def test_prometheus_names_follow_the_otel_translation() -> None:
    for m in METRICS:
        assert m.name.startswith("otelflow.")
        base = m.name.replace(".", "_")
        if m.unit == "By" and not base.endswith("_bytes"):
            base += "_bytes"
        if m.unit == "s":
            base += "_seconds"
        if m.kind == "counter":
            base += "_total"
        assert m.prometheus == base, m.name


def test_every_exported_metric_is_in_the_schema() -> None:
    names = {m.name for m in METRICS}
    assert set(Aggregator.METRIC_NAMES) <= names


def test_self_metric_names() -> None:
    for m in SELF_METRICS:
        assert m.name.startswith("otelflow_agent_")
        assert (m.kind == "counter") == m.name.endswith("_total")
        assert otel_name(m.name).startswith("otelflow.agent.")


def test_levels_nest() -> None:
    w, p, f = (set(metric_attribute_names(level)) for level in ("workload", "pod", "flow"))
    assert w < p < f
    assert "source.k8s.pod.name" in p - w and "source.address" in f - p
