"""Tests for otelflow.config: defaults, the YAML file, environment overrides and error messages."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from otelflow.config import Config, ConfigError, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"


def write(tmp_path: Path, text: str, name: str = "otelflow.yaml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(p)


def error(path: str | None = None, env: dict[str, str] | None = None) -> str:
    """Load, expect a ConfigError, check it is one line, and return its text."""
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg
    assert msg.startswith("config error")
    return msg


FULL_YAML = """\
node_name: node-a
cluster_name: prod
log_level: debug
source:
  mode: conntrack
  poll_interval: 500ms
  conntrack:
    enable_acct: true
    event_buffer_bytes: 65536
  ebpf:
    max_entries: 4096
    interfaces: 'vp*,eth0'
    exclude_interfaces: vpx*
    idle_timeout: 30s
    tcp_health: false
    attach: tc
export:
  interval: 1.5m
  temporality: delta
  service_name: flows
  resource_attributes:
    deployment.environment: staging
    team: net
  otlp:
    endpoint: https://collector.example:4318
    protocol: http/protobuf
    headers:
      authorization: Bearer abc
    compression: none
    compression_level: 9
    timeout: 2
    certificate: /etc/ca.pem
    client_certificate: /etc/client.pem
    client_key: /etc/client.key
    insecure: false
  prometheus:
    listen: "[::]:9464"
  metrics:
    level: pod
    exclude: server.port
  logs:
    sample_percent: 25
metadata:
  inventory: /etc/otelflow/inventory.yaml
  history: 10m
  kubernetes:
    enabled: "true"
    kubeconfig: /etc/kubeconfig
    page_size: 100
api:
  listen: ""
  top_window: 30s
  top_max_connections: 500
"""

FULL_DICT = {
    "node_name": "node-a",
    "cluster_name": "prod",
    "log_level": "debug",
    "source": {
        "mode": "conntrack",
        "poll_interval": 0.5,
        "conntrack": {"enable_acct": True, "event_buffer_bytes": 65536},
        "ebpf": {
            "max_entries": 4096,
            "interfaces": "vp*,eth0",
            "exclude_interfaces": "vpx*",
            "idle_timeout": 30.0,
            "tcp_health": False,
            "attach": "tc",
        },
    },
    "export": {
        "interval": 90.0,
        "temporality": "delta",
        "service_name": "flows",
        "resource_attributes": {"deployment.environment": "staging", "team": "net"},
        "otlp": {
            "endpoint": "https://collector.example:4318",
            "protocol": "http/protobuf",
            "headers": {"authorization": "Bearer abc"},
            "compression": "none",
            "compression_level": 9,
            "timeout": 2.0,
            "certificate": "/etc/ca.pem",
            "client_certificate": "/etc/client.pem",
            "client_key": "/etc/client.key",
            "insecure": False,
        },
        "prometheus": {"listen": "[::]:9464"},
        "metrics": {
            "level": "pod",
            "include": "",
            "exclude": "server.port",
            "max_series": 10000,
            "idle_intervals": 5,
        },
        "logs": {"enabled": True, "namespaces": "", "classes": "", "min_bytes": 0, "sample_percent": 25},
    },
    "metadata": {
        "inventory": "/etc/otelflow/inventory.yaml",
        "history": 600.0,
        "kubernetes": {"enabled": "true", "kubeconfig": "/etc/kubeconfig", "page_size": 100},
    },
    "api": {"listen": "", "top_window": 30.0, "top_max_connections": 500},
}


# --- defaults and the file -----------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.node_name == "" and cfg.cluster_name == "" and cfg.log_level == "info"
    assert cfg.source.mode == "auto" and cfg.source.poll_interval == 5.0
    assert cfg.source.conntrack.enable_acct is False
    assert cfg.source.conntrack.event_buffer_bytes == 8388608
    assert cfg.export.interval == 60.0 and cfg.export.temporality == "cumulative"
    assert cfg.export.service_name == "otelflow" and cfg.export.resource_attributes == {}
    otlp = cfg.export.otlp
    assert (otlp.endpoint, otlp.protocol, otlp.headers, otlp.compression) == ("", "grpc", {}, "gzip")
    assert otlp.timeout == 10.0 and otlp.insecure is False
    assert (otlp.certificate, otlp.client_certificate, otlp.client_key) == ("", "", "")
    assert cfg.export.prometheus.listen == ""
    assert cfg.api.listen == "127.0.0.1:9465"


def test_config_is_frozen() -> None:
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.log_level = "debug"  # type: ignore[misc]


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()
    assert load_config(write(tmp_path, "# only a comment\n"), env={}) == Config()


def test_empty_section_is_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "source:\nexport:\n  otlp:\n"), env={}) == Config()


def test_full_file_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL_YAML), env={})
    assert config_to_dict(cfg) == FULL_DICT
    # what --print-config shows loads back to the same configuration
    again = load_config(write(tmp_path, yaml.safe_dump(config_to_dict(cfg)), "again.yaml"), env={})
    assert again == cfg


def test_path_none_reads_no_file() -> None:
    assert load_config(None, env={"OTELFLOW_CLUSTER_NAME": "c"}).cluster_name == "c"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("1.5m", 90.0), ("1h", 3600.0), ("2", 2.0), (3, 3.0), (0.25, 0.25)],
)
def test_duration_forms(tmp_path: Path, text: object, seconds: float) -> None:
    path = write(tmp_path, yaml.safe_dump({"source": {"poll_interval": text}}))
    assert load_config(path, env={}).source.poll_interval == seconds


@pytest.mark.parametrize("listen", [":9464", "0.0.0.0:9464", "localhost:1", "[::]:9464", "[::1]:65535", ""])
def test_good_listen_addresses(tmp_path: Path, listen: str) -> None:
    path = write(tmp_path, yaml.safe_dump({"export": {"prometheus": {"listen": listen}}}))
    assert load_config(path, env={}).export.prometheus.listen == listen


def test_enum_is_case_insensitive(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "log_level: DEBUG\n"), env={}).log_level == "debug"


# --- errors --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    msg = error(path)
    assert msg.startswith(f"config error in {path}: ")
    assert "No such file" in msg


def test_malformed_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  mode: auto\n  poll_interval: [1\n")
    msg = error(path)
    assert msg.startswith(f"config error in {path}: line ")
    assert "malformed YAML: " in msg


def test_malformed_yaml_line_number(tmp_path: Path) -> None:
    msg = error(write(tmp_path, "a: b\nc: d: e\n"))
    assert ": line 2: malformed YAML: mapping values are not allowed here" in msg


def test_duplicate_key_is_malformed(tmp_path: Path) -> None:
    msg = error(write(tmp_path, "source:\n  mode: ebpf\n  mode: conntrack\n"))
    assert "line 3: malformed YAML: duplicate key 'mode'" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    msg = error(write(tmp_path, text))
    assert "top level: expected a mapping" in msg


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  mdoe: ebpf\n")
    assert error(path) == f"config error in {path}: source.mdoe: unknown key (did you mean 'mode'?)"


def test_unknown_key_without_suggestion_lists_known(tmp_path: Path) -> None:
    msg = error(write(tmp_path, "api:\n  zzz: 1\n"))
    assert "api.zzz: unknown key (known keys: listen, top_window, top_max_connections)" in msg


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert "exporter: unknown key (did you mean 'export'?)" in error(write(tmp_path, "exporter: {}\n"))


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            "source:\n  conntrack:\n    enable_acct: 'yes'\n",
            "source.conntrack.enable_acct",
            "expected true or false",
        ),
        (
            "source:\n  conntrack:\n    enable_acct: 1\n",
            "source.conntrack.enable_acct",
            "expected true or false",
        ),
        (
            "source:\n  conntrack:\n    event_buffer_bytes: true\n",
            "source.conntrack.event_buffer_bytes",
            "integer",
        ),
        (
            "source:\n  conntrack:\n    event_buffer_bytes: '1M'\n",
            "source.conntrack.event_buffer_bytes",
            "integer",
        ),
        (
            "source:\n  conntrack:\n    event_buffer_bytes: 1024\n",
            "source.conntrack.event_buffer_bytes",
            "65536",
        ),
        ("cluster_name: 7\n", "cluster_name", "expected a string, got 7"),
        ("node_name:\n", "node_name", "expected a string, got None"),
        ("source: fast\n", "source", "expected a section"),
        ("export:\n  resource_attributes: [a]\n", "export.resource_attributes", "expected a mapping"),
        (
            "export:\n  otlp:\n    headers:\n      x: 1\n",
            "export.otlp.headers",
            "value of 'x' must be a string",
        ),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, key: str, problem: str) -> None:
    msg = error(write(tmp_path, text))
    assert f": {key}: " in msg
    assert problem in msg


def test_bad_enum(tmp_path: Path) -> None:
    path = write(tmp_path, "export:\n  otlp:\n    protocol: http/json\n")
    assert error(path) == (
        f"config error in {path}: export.otlp.protocol: "
        "expected one of 'grpc', 'http/protobuf', got 'http/json'"
    )


def test_bad_duration(tmp_path: Path) -> None:
    path = write(tmp_path, "export:\n  otlp:\n    timeout: abc\n")
    assert error(path) == (
        f"config error in {path}: export.otlp.timeout: "
        "expected a duration like '10s' or a number of seconds, got 'abc'"
    )


@pytest.mark.parametrize("value", ["0", "-5", "0s", "-1m", ".inf", "true"])
def test_zero_negative_or_odd_duration(tmp_path: Path, value: str) -> None:
    msg = error(write(tmp_path, f"export:\n  interval: {value}\n"))
    assert ": export.interval: " in msg


def test_zero_duration_message(tmp_path: Path) -> None:
    assert "source.poll_interval: must be a positive duration, got 0" in error(
        write(tmp_path, "source:\n  poll_interval: 0\n")
    )


@pytest.mark.parametrize(
    ("listen", "problem"),
    [
        ("9464", "expected 'host:port'"),
        ("0.0.0.0:0", "port must be a number in 1..65535"),
        ("0.0.0.0:65536", "port must be a number in 1..65535"),
        ("host:http", "port must be a number"),
        ("::1:9464", "IPv6 addresses need brackets"),
        ("[::1]9464", "expected 'host:port'"),
        ("[nope]:9464", "not a valid IPv6 address"),
        ("300.1.1.1:80", "not a valid IPv4 address"),
        ("bad_host!:80", "not a valid host name"),
    ],
)
def test_bad_listen_address(tmp_path: Path, listen: str, problem: str) -> None:
    msg = error(write(tmp_path, yaml.safe_dump({"export": {"prometheus": {"listen": listen}}})))
    assert ": export.prometheus.listen: " in msg
    assert problem in msg


def test_bad_api_listen(tmp_path: Path) -> None:
    assert ": api.listen: " in error(write(tmp_path, "api:\n  listen: 'localhost'\n"))


@pytest.mark.parametrize(
    "endpoint", ["collector:4317", "ftp://collector", "http://", "http:///v1", "http://a:99999", "http://a b"]
)
def test_bad_endpoint_url(tmp_path: Path, endpoint: str) -> None:
    msg = error(write(tmp_path, yaml.safe_dump({"export": {"otlp": {"endpoint": endpoint}}})))
    assert ": export.otlp.endpoint: " in msg


@pytest.mark.parametrize(
    "endpoint", ["http://collector:4317", "https://otel.example.com", "http://[::1]:4318/x"]
)
def test_good_endpoint_url(tmp_path: Path, endpoint: str) -> None:
    path = write(tmp_path, yaml.safe_dump({"export": {"otlp": {"endpoint": endpoint}}}))
    assert load_config(path, env={}).export.otlp.endpoint == endpoint


# --- standard OTEL_* variables -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "attr", "expected"),
    [
        ("OTEL_SERVICE_NAME", "svc", "export.service_name", "svc"),
        ("OTEL_RESOURCE_ATTRIBUTES", "a=1,b=2", "export.resource_attributes", {"a": "1", "b": "2"}),
        ("OTEL_METRIC_EXPORT_INTERVAL", "15000", "export.interval", 15.0),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317", "export.otlp.endpoint", "http://c:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", "export.otlp.protocol", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret", "export.otlp.headers", {"api-key": "s=cret"}),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "none", "export.otlp.compression", "none"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500", "export.otlp.timeout", 2.5),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem", "export.otlp.certificate", "/ca.pem"),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem", "export.otlp.client_certificate", "/c.pem"),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/c.key", "export.otlp.client_key", "/c.key"),
        ("OTEL_EXPORTER_OTLP_INSECURE", "true", "export.otlp.insecure", True),
        ("OTEL_EXPORTER_OTLP_INSECURE", "FALSE", "export.otlp.insecure", False),
    ],
)
def test_otel_variables(var: str, value: str, attr: str, expected: object) -> None:
    obj: object = load_config(env={var: value})
    for part in attr.split("."):
        obj = getattr(obj, part)
    assert obj == expected


def test_otel_timeout_not_an_integer() -> None:
    assert error(env={"OTEL_EXPORTER_OTLP_TIMEOUT": "x"}) == (
        "config error: OTEL_EXPORTER_OTLP_TIMEOUT: expected milliseconds as an integer, got 'x'"
    )


@pytest.mark.parametrize("value", ["10s", "1.5", "0", "-100"])
def test_otel_interval_must_be_positive_integer_ms(value: str) -> None:
    assert error(env={"OTEL_METRIC_EXPORT_INTERVAL": value}).startswith(
        "config error: OTEL_METRIC_EXPORT_INTERVAL: "
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
        ("OTEL_EXPORTER_OTLP_INSECURE", "maybe"),
        ("OTEL_RESOURCE_ATTRIBUTES", "a=1,novalue"),
    ],
)
def test_bad_otel_variables(var: str, value: str) -> None:
    assert error(env={var: value}).startswith(f"config error: {var}: ")


def test_bad_headers_do_not_echo_secrets() -> None:
    msg = error(env={"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer x,topsecret"})
    assert "topsecret" not in msg and "Bearer" not in msg


def test_resource_attributes_merge_and_percent_decoding(tmp_path: Path) -> None:
    path = write(tmp_path, "export:\n  resource_attributes:\n    keep: file\n    team: file\n")
    env = {"OTEL_RESOURCE_ATTRIBUTES": "team=net%20ops, region = eu%2Cwest ,url=a%3Db,"}
    attrs = load_config(path, env=env).export.resource_attributes
    assert attrs == {"keep": "file", "team": "net ops", "region": "eu,west", "url": "a=b"}


def test_resource_attributes_merge_across_all_layers(tmp_path: Path) -> None:
    path = write(tmp_path, "export:\n  resource_attributes:\n    a: file\n    b: file\n    c: file\n")
    env = {"OTELFLOW_EXPORT__RESOURCE_ATTRIBUTES": "b=flow,c=flow", "OTEL_RESOURCE_ATTRIBUTES": "c=otel"}
    assert load_config(path, env=env).export.resource_attributes == {"a": "file", "b": "flow", "c": "otel"}


def test_empty_env_values_are_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "export:\n  service_name: from-file\n  otlp:\n    timeout: 3s\n")
    env = {
        "OTEL_SERVICE_NAME": "",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "",
        "OTEL_EXPORTER_OTLP_INSECURE": "",
        "OTELFLOW_SOURCE__MODE": "",
        "NODE_NAME": "",
    }
    cfg = load_config(path, env=env)
    assert cfg.export.service_name == "from-file"
    assert cfg.export.otlp.timeout == 3.0
    assert cfg.export.otlp.insecure is False
    assert cfg.source.mode == "auto"
    assert cfg.node_name == ""


# --- OTELFLOW_* variables and precedence ---------------------------------------------------------


def test_otelflow_nested_overrides() -> None:
    cfg = load_config(
        env={
            "OTELFLOW_SOURCE__MODE": "conntrack",
            "OTELFLOW_SOURCE__POLL_INTERVAL": "250ms",
            "OTELFLOW_SOURCE__CONNTRACK__ENABLE_ACCT": "Yes",
            "OTELFLOW_SOURCE__CONNTRACK__EVENT_BUFFER_BYTES": "1048576",
            "OTELFLOW_EXPORT__PROMETHEUS__LISTEN": ":9464",
            "OTELFLOW_EXPORT__OTLP__HEADERS": "a=1,b=x%20y",
            "OTELFLOW_EXPORT__INTERVAL": "30",
            "OTELFLOW_CLUSTER_NAME": "prod",
            "OTELFLOW_LOG_LEVEL": "warning",
        }
    )
    assert cfg.source.mode == "conntrack"
    assert cfg.source.poll_interval == 0.25
    assert cfg.source.conntrack.enable_acct is True
    assert cfg.source.conntrack.event_buffer_bytes == 1048576
    assert cfg.export.prometheus.listen == ":9464"
    assert cfg.export.otlp.headers == {"a": "1", "b": "x y"}
    assert cfg.export.interval == 30.0
    assert cfg.cluster_name == "prod"
    assert cfg.log_level == "warning"


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("1", True), ("NO", False), ("0", False)])
def test_otelflow_bool_words(text: str, expected: bool) -> None:
    assert load_config(
        env={"OTELFLOW_SOURCE__CONNTRACK__ENABLE_ACCT": text}
    ).source.conntrack.enable_acct is (expected)


def test_precedence_file_then_otelflow_then_otel(tmp_path: Path) -> None:
    path = write(tmp_path, "export:\n  service_name: file\n  interval: 10s\n  temporality: delta\n")
    assert load_config(path, env={}).export.service_name == "file"
    env = {"OTELFLOW_EXPORT__SERVICE_NAME": "otelflow-env", "OTELFLOW_EXPORT__INTERVAL": "20s"}
    cfg = load_config(path, env=env)
    assert (cfg.export.service_name, cfg.export.interval, cfg.export.temporality) == (
        "otelflow-env",
        20.0,
        "delta",
    )
    env |= {"OTEL_SERVICE_NAME": "otel-env", "OTEL_METRIC_EXPORT_INTERVAL": "30000"}
    cfg = load_config(path, env=env)
    assert (cfg.export.service_name, cfg.export.interval, cfg.export.temporality) == (
        "otel-env",
        30.0,
        "delta",
    )


def test_unknown_otelflow_variable_with_suggestion() -> None:
    assert error(env={"OTELFLOW_SOURCE__MDOE": "ebpf"}) == (
        "config error: OTELFLOW_SOURCE__MDOE: unknown setting (did you mean OTELFLOW_SOURCE__MODE?)"
    )
    assert "did you mean OTELFLOW_SOURCE__MODE?" in error(env={"OTELFLOW_SOURCE_MODE": "ebpf"})
    assert error(env={"OTELFLOW_XYZZY": "1"}) == "config error: OTELFLOW_XYZZY: unknown setting"


def test_otelflow_section_variable_is_unknown() -> None:
    assert error(env={"OTELFLOW_SOURCE": "ebpf"}).startswith("config error: OTELFLOW_SOURCE: unknown setting")


def test_otelflow_config_is_reserved() -> None:
    assert load_config(env={"OTELFLOW_CONFIG": "/does/not/matter.yaml"}) == Config()


@pytest.mark.parametrize(
    ("var", "value", "problem"),
    [
        ("OTELFLOW_SOURCE__MODE", "magic", "expected one of 'auto', 'ebpf', 'conntrack'"),
        ("OTELFLOW_SOURCE__POLL_INTERVAL", "soon", "expected a duration"),
        ("OTELFLOW_SOURCE__POLL_INTERVAL", "-1s", "must be a positive duration"),
        ("OTELFLOW_SOURCE__CONNTRACK__ENABLE_ACCT", "maybe", "expected true or false"),
        ("OTELFLOW_SOURCE__CONNTRACK__EVENT_BUFFER_BYTES", "big", "expected an integer"),
        ("OTELFLOW_SOURCE__CONNTRACK__EVENT_BUFFER_BYTES", "4096", "must be at least 65536"),
        ("OTELFLOW_API__LISTEN", "[::]", "expected 'host:port'"),
        ("OTELFLOW_EXPORT__OTLP__ENDPOINT", "grpc://c:4317", "expected a URL"),
    ],
)
def test_bad_otelflow_values(var: str, value: str, problem: str) -> None:
    msg = error(env={var: value})
    assert msg.startswith(f"config error: {var}: ")
    assert problem in msg


def test_node_name_fallback(tmp_path: Path) -> None:
    assert load_config(env={"NODE_NAME": "k8s-node"}).node_name == "k8s-node"
    assert load_config(env={"NODE_NAME": "k8s-node", "OTELFLOW_NODE_NAME": "mine"}).node_name == "mine"
    # the downward API beats a node_name left in a shared file
    path = write(tmp_path, "node_name: from-file\n")
    assert load_config(path, env={}).node_name == "from-file"
    assert load_config(path, env={"NODE_NAME": "k8s-node"}).node_name == "k8s-node"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith(("OTELFLOW_", "OTEL_")) or var == "NODE_NAME":
            monkeypatch.delenv(var)
    monkeypatch.setenv("OTELFLOW_CLUSTER_NAME", "from-os")
    assert load_config().cluster_name == "from-os"


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_exits_2_with_one_line_on_bad_config(tmp_path: Path) -> None:
    # cli.build_parser() imports the netlab subcommand; without it no command can run at all
    pytest.importorskip(
        "otelflow.netlab.cli", reason="otelflow.netlab.cli (needed by the CLI) is not there yet"
    )
    path = write(tmp_path, "source:\n  mdoe: ebpf\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTELFLOW_", "OTEL_"))}
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    proc = subprocess.run(
        [python, "-m", "otelflow", "run", "-c", path],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("otelflow: config error")
    assert "source.mdoe" in lines[0]
