"""Which endpoint the demo's agents export to, from the same variables the agent reads (and the
per-signal ones), with a one-line error for each unusable setting."""

from __future__ import annotations

import pytest

from otelflow.demo_otlp import ExportSetupError, plan_export


def test_no_endpoint_no_export() -> None:
    assert plan_export({}) is None


def test_general_endpoint_kept_unchanged() -> None:
    p = plan_export({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4317"})
    assert p is not None
    assert (p.endpoint, p.protocol, p.host, p.port) == (
        "https://collector.example:4317",
        "grpc",
        "collector.example",
        4317,
    )
    assert p.origin == "OTEL_EXPORTER_OTLP_ENDPOINT" and p.listen_hosts == ["127.0.0.1", "::1"]
    assert p.env == {
        "OTELFLOW_EXPORT__OTLP__ENDPOINT": "https://collector.example:4317",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4317",
        "OTELFLOW_EXPORT__INTERVAL": "5s",
    }


def test_default_ports_and_own_namespace_variable() -> None:
    p = plan_export(
        {"OTELFLOW_EXPORT__OTLP__ENDPOINT": "http://127.0.0.1", "OTEL_METRIC_EXPORT_INTERVAL": "2000"}
    )
    assert p is not None and (p.port, p.origin, p.listen_hosts) == (
        4317,
        "OTELFLOW_EXPORT__OTLP__ENDPOINT",
        ["127.0.0.1"],
    )
    assert "OTELFLOW_EXPORT__INTERVAL" not in p.env  # the user's interval stays
    p = plan_export(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c.example", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    )
    assert p is not None and p.port == 443


def test_per_signal_endpoints_name_one_base() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c.example:4318/v1/metrics",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://c.example:4318/v1/logs",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other.example:4318",  # the per-signal ones win
    }
    p = plan_export(env)
    assert p is not None and (p.endpoint, p.port, p.origin) == (
        "http://c.example:4318",
        4318,
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    )
    env["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"] = "http://logs.example:4318/v1/logs"
    with pytest.raises(ExportSetupError, match="differ: the agent exports metrics and logs to one endpoint"):
        plan_export(env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317"},
            "OTEL_EXPORTER_OTLP_ENDPOINT: expected a URL like 'http://collector:4317'",
        ),
        (
            {"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "ftp://c:21"},
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT: expected a URL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:9465"},
            "port 9465 is the agent's own api.listen or prometheus.listen port",
        ),
        ({"OTELFLOW_EXPORT__OTLP__ENDPOIN": "http://c:4317"}, "unknown setting"),
    ],
)
def test_bad_settings_are_one_line_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ExportSetupError) as e:
        plan_export(env)
    assert message in str(e.value) and "\n" not in str(e.value)
