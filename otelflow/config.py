"""Agent configuration: typed defaults, an optional YAML file, then environment variables.

Precedence, lowest to highest:

1. the defaults in the dataclasses below;
2. the YAML file given to :func:`load_config` (keys are the snake_case field names, nested by section);
3. ``OTELFLOW_<PATH>`` variables, one per field: the dotted path upper-cased with ``__`` between
   levels, e.g. ``OTELFLOW_SOURCE__MODE=conntrack`` or ``OTELFLOW_EXPORT__PROMETHEUS__LISTEN=:9464``.
   ``NODE_NAME`` (the Kubernetes downward API) sets ``node_name`` just below ``OTELFLOW_NODE_NAME``;
4. the standard OpenTelemetry variables (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
   ``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_EXPORTER_OTLP_*``), see ``_OTEL_ENV``.

Environment rules: an empty value counts as unset (as the OpenTelemetry spec says). Values are parsed
by the field's type: bools accept true/false/1/0/yes/no, durations accept "500ms", "10s", "1.5m", "1h"
or a number of seconds, dicts accept "k=v,k2=v2" with percent-encoded keys and values. A dict from the
environment is merged into the one below it (same keys are replaced, other keys are kept). The
``OTEL_*`` durations are integer milliseconds, as the spec says. An ``OTELFLOW_`` variable that names
no field is an error, except ``OTELFLOW_CONFIG``, which is reserved for the config file path.

In the file, types are strict: a bool must be a YAML bool, an int a YAML int, a string a string; a
duration is a positive number of seconds or a string with a unit; an enum whose choices include
"true" and "false" (``metadata.kubernetes.enabled``) also takes a YAML bool. Every problem raises
:class:`ConfigError` with a one-line message naming the file or variable and the dotted key.

The model is a tree of frozen dataclasses; the loader is generic and driven by the field types:
``bool``, ``int``, ``str``, :data:`Duration`, ``Literal[...]`` (enums), ``dict[str, str]`` and nested
section dataclasses. ``Annotated[T, check]`` adds a validator, a callable that raises ``_Bad``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NewType, get_args, get_origin, get_type_hints
from urllib.parse import unquote, urlsplit

import yaml

__all__ = [
    "ApiConfig",
    "Config",
    "ConfigError",
    "ConntrackConfig",
    "Duration",
    "ExportConfig",
    "KubernetesConfig",
    "LogsConfig",
    "MetadataConfig",
    "MetricsConfig",
    "OtlpConfig",
    "PrometheusConfig",
    "SourceConfig",
    "config_to_dict",
    "load_config",
]

# A duration, stored as float seconds.
Duration = NewType("Duration", float)


class ConfigError(Exception):
    """A configuration problem; ``str(e)`` is one line naming the source, the key and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", " ").replace("\n", " "))


class _Bad(Exception):
    """The problem with one value; the caller adds where it came from and which key."""


def _show(value: object) -> str:
    """``repr`` of a bad value for an error message, kept short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- validators used with Annotated[...] -----------------------------------------------------------

_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _check_host(host: str) -> None:
    if all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Bad(f"{host!r} is not a valid IPv4 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise _Bad(f"{host!r} is not a valid host name or IP address")


def _check_listen(value: str) -> None:
    """``host:port``, ``:port`` or ``[ipv6]:port``; empty means disabled."""
    if not value:
        return
    form = "expected 'host:port' (IPv6 as '[::]:9464')"
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise _Bad(f"{form}, got {value!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Bad(f"{host!r} is not a valid IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise _Bad(f"{form}, got {value!r}")
        if ":" in host:
            raise _Bad(f"IPv6 addresses need brackets, like '[::]:9464', got {value!r}")
        if host:
            _check_host(host)
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise _Bad(f"port must be a number in 1..65535, got {value!r}")


def _check_url(value: str) -> None:
    """An http or https URL with a host; empty means unset."""
    if not value:
        return
    form = f"expected a URL like 'http://collector:4317' (scheme http or https), got {_show(value)}"
    if any(c.isspace() for c in value):
        raise _Bad(form)
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0  # .port raises ValueError when out of range
    except ValueError:
        raise _Bad(f"bad host or port in URL {_show(value)}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _Bad(form)
    if not port_ok:
        raise _Bad(f"bad host or port in URL {_show(value)}")


def _at_least(minimum: int) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value < minimum:
            raise _Bad(f"must be at least {minimum}, got {value}")

    return check


def _between(low: int, high: int) -> Callable[[int], None]:
    def check(value: int) -> None:
        if not low <= value <= high:
            raise _Bad(f"must be between {low} and {high}, got {value}")

    return check


def _check_attribute_list(value: str) -> None:
    from otelflow.schema import metric_attribute_names

    known = metric_attribute_names("flow")
    for name in (n.strip() for n in value.split(",")):
        if name and name not in known:
            hint = _closest(name, list(known))
            raise _Bad(f"unknown attribute {name!r}" + (f" (did you mean {hint!r}?)" if hint else ""))


ListenAddress = Annotated[str, _check_listen]
Url = Annotated[str, _check_url]


# --- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConntrackConfig:
    enable_acct: bool = False  # let the agent set net.netfilter.nf_conntrack_acct=1 if it is 0
    event_buffer_bytes: Annotated[int, _at_least(65536)] = 8388608  # netlink socket receive buffer


@dataclass(frozen=True, slots=True)
class EbpfConfig:
    max_entries: Annotated[int, _at_least(64)] = 65536  # flows per interval the TC flow map holds
    interfaces: str = ""  # comma-separated globs of interfaces to attach to; empty = every Ethernet one
    exclude_interfaces: str = ""  # comma-separated globs of interfaces never attached to
    idle_timeout: Duration = Duration(120.0)  # a flow conntrack does not know ends after this idle time
    tcp_health: bool = True  # retransmits, resets and RTT from TCP tracepoints, where the kernel allows
    attach: Literal["auto", "tcx", "tc"] = "auto"  # TC attach backend; auto: tcx where the kernel has it


@dataclass(frozen=True, slots=True)
class SourceConfig:
    mode: Literal["auto", "ebpf", "conntrack"] = "auto"  # flow source; auto prefers eBPF
    poll_interval: Duration = Duration(5.0)  # how often the flow source is read
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)  # conntrack source settings
    ebpf: EbpfConfig = field(default_factory=EbpfConfig)  # eBPF source settings


@dataclass(frozen=True, slots=True)
class OtlpConfig:
    endpoint: Url = ""  # collector URL; empty = no OTLP export
    protocol: Literal["grpc", "http/protobuf"] = "grpc"  # OTLP transport
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers (may hold secrets)
    compression: Literal["gzip", "none"] = "gzip"  # request compression
    compression_level: Annotated[int, _between(1, 9)] = 1  # gzip level of OTLP/HTTP (gRPC: grpc core's 6)
    timeout: Duration = Duration(10.0)  # per-export request timeout
    certificate: str = ""  # path to a CA bundle to verify the collector
    client_certificate: str = ""  # path to a client certificate for mTLS
    client_key: str = ""  # path to the client certificate's private key
    insecure: bool = False  # gRPC without TLS


@dataclass(frozen=True, slots=True)
class PrometheusConfig:
    listen: ListenAddress = ""  # "host:port" serving /metrics; empty disables


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    level: Literal["workload", "pod", "flow"] = "workload"  # aggregation level of flow metrics
    include: Annotated[str, _check_attribute_list] = ""  # comma-separated attributes to add
    exclude: Annotated[str, _check_attribute_list] = ""  # comma-separated attributes to drop
    max_series: Annotated[int, _at_least(10)] = 10000  # per metric; more goes to one overflow series
    idle_intervals: Annotated[int, _at_least(1)] = 5  # forget a series idle for this many exports


@dataclass(frozen=True, slots=True)
class LogsConfig:
    enabled: bool = True  # flow logs over OTLP (when an endpoint is set)
    namespaces: str = ""  # comma-separated: keep flows with an end in these namespaces (empty: all)
    classes: str = ""  # comma-separated peer classes to keep (pod, node, public, <group>...; empty: all)
    min_bytes: Annotated[int, _at_least(0)] = 0  # drop records that moved fewer bytes (open/close kept)
    sample_percent: Annotated[int, _between(0, 100)] = 100  # keep this % of flows (consistent per flow)


@dataclass(frozen=True, slots=True)
class ExportConfig:
    interval: Duration = Duration(60.0)  # how often metrics are exported
    temporality: Literal["cumulative", "delta"] = "cumulative"  # OTLP aggregation temporality
    service_name: str = "otelflow"  # service.name resource attribute
    resource_attributes: dict[str, str] = field(default_factory=dict)  # extra resource attributes
    otlp: OtlpConfig = field(default_factory=OtlpConfig)  # OTLP push exporter
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)  # Prometheus pull endpoint
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # flow metric shape and cardinality
    logs: LogsConfig = field(default_factory=LogsConfig)  # flow logs


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    # "auto": on when a kubeconfig is set or the agent runs in a pod; a YAML bool works too
    enabled: Literal["auto", "true", "false"] = "auto"
    kubeconfig: str = ""  # kubeconfig file (current-context); empty: the pod's ServiceAccount
    page_size: Annotated[int, _at_least(1)] = 500  # objects per page when listing


@dataclass(frozen=True, slots=True)
class MetadataConfig:
    inventory: str = ""  # static inventory file: names without Kubernetes (outside hosts, the demo)
    history: Duration = Duration(300.0)  # how long a released address still names its old owner
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)  # list+watch cache


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: ListenAddress = "127.0.0.1:9465"  # "host:port" for health and JSON endpoints; empty disables
    top_window: Duration = Duration(10.0)  # /api/v1/top: rates are averaged over this sliding window
    top_max_connections: Annotated[int, _at_least(1)] = 10000  # /api/v1/top: flows kept (LRU beyond)


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str = ""  # this node's name (k8s.node.name)
    cluster_name: str = ""  # k8s.cluster.name
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # agent log verbosity
    source: SourceConfig = field(default_factory=SourceConfig)  # where flows come from
    export: ExportConfig = field(default_factory=ExportConfig)  # where metrics go
    metadata: MetadataConfig = field(default_factory=MetadataConfig)  # naming flow ends
    api: ApiConfig = field(default_factory=ApiConfig)  # local HTTP API


# --- parsing one value by its type ---------------------------------------------------------------

_DURATION = re.compile(r"(?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _split(tp: Any) -> tuple[Any, tuple[Callable[[Any], None], ...]]:
    """``Annotated[T, check, ...]`` -> ``(T, (check, ...))``; any other type -> ``(tp, ())``."""
    if get_origin(tp) is Annotated:
        base, *checks = get_args(tp)
        return base, tuple(checks)
    return tp, ()


def _positive(seconds: float, raw: object) -> Duration:
    if not math.isfinite(seconds) or seconds <= 0:
        raise _Bad(f"must be a positive duration, got {_show(raw)}")
    return Duration(seconds)


def _duration(value: object) -> Duration:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _positive(float(value), value)
    m = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise _Bad(f"expected a duration like '10s' or a number of seconds, got {_show(value)}")
    return _positive(float(m["num"]) * _UNIT_SECONDS[m["unit"]], value)


def _millis(text: str) -> Duration:
    """The OTel spec's integer milliseconds."""
    try:
        ms = int(text.strip())
    except ValueError:
        raise _Bad(f"expected milliseconds as an integer, got {_show(text)}") from None
    if ms <= 0:
        raise _Bad(f"expected a positive number of milliseconds, got {_show(text)}")
    return Duration(ms / 1000.0)


def _pairs(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` with percent-encoding, as in OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_HEADERS.

    Problems name the entry's position, not its text: header values are often secrets.
    """
    out: dict[str, str] = {}
    for n, item in enumerate(text.split(","), 1):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = unquote(key.strip())
        if not sep or not key:
            raise _Bad(f"expected comma-separated key=value pairs; entry {n} has no key=value")
        out[key] = unquote(value.strip())
    return out


def _parse(tp: Any, value: object, from_env: bool) -> Any:
    """Convert a YAML value (strict types) or an environment string to ``tp``, then validate it."""
    base, checks = _split(tp)
    result: Any
    if base is Duration:
        result = _duration(value)
    elif base is bool:
        if from_env and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            result = value.strip().lower() in _TRUE
        elif not from_env and isinstance(value, bool):
            result = value
        else:
            raise _Bad(f"expected true or false, got {_show(value)}")
    elif base is int:
        if from_env and isinstance(value, str):
            try:
                result = int(value.strip())
            except ValueError:
                raise _Bad(f"expected an integer, got {_show(value)}") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            result = value
        else:
            raise _Bad(f"expected an integer, got {_show(value)}")
    elif base is str:
        if not isinstance(value, str):
            raise _Bad(f"expected a string, got {_show(value)}")
        result = value
    elif get_origin(base) is Literal:
        choices = get_args(base)
        if isinstance(value, bool) and "true" in choices:  # a YAML bool for a "true"/"false" choice
            value = "true" if value else "false"
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise _Bad(f"expected one of {', '.join(map(repr, choices))}, got {_show(value)}")
        result = value.strip().lower()
    elif get_origin(base) is dict:
        if from_env and isinstance(value, str):
            result = _pairs(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise _Bad(f"key {_show(k)} must be a string")
                if not isinstance(v, str):
                    raise _Bad(f"value of {k!r} must be a string (quote it), got {_show(v)}")
            result = dict(value)
        else:
            raise _Bad(f"expected a mapping of strings to strings, got {_show(value)}")
    else:  # pragma: no cover - a field type this loader does not know is a bug in the model above
        raise TypeError(f"unsupported config field type {base!r}")
    for check in checks:
        check(result)
    return result


# --- walking the model ---------------------------------------------------------------------------

_Path = tuple[str, ...]


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaves(cls: type, path: _Path = ()) -> Iterator[tuple[_Path, Any]]:
    """Every non-section field under ``cls`` as ``(path, type)``."""
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            yield from _leaves(tp, (*path, name))
        else:
            yield (*path, name), tp


def _dotted(path: _Path) -> str:
    return ".".join(path)


def _closest(name: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _from_file(cls: type, data: Mapping[Any, Any], path: _Path, out: dict[_Path, Any], where: str) -> None:
    """Parse a YAML mapping for section ``cls`` into ``out`` (path -> value)."""
    hints = _hints(cls)
    for key, value in data.items():
        here = (*path, str(key))
        if key not in hints:
            close = _closest(str(key), list(hints))
            hint = f"did you mean {close!r}?" if close else f"known keys: {', '.join(hints)}"
            raise ConfigError(f"{where}: {_dotted(here)}: unknown key ({hint})")
        tp = hints[key]
        if _is_section(tp):
            if value is None:  # a section with nothing under it
                continue
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: {_dotted(here)}: expected a section (mapping), got {_show(value)}"
                )
            _from_file(tp, value, here, out, where)
            continue
        try:
            out[here] = _parse(tp, value, from_env=False)
        except _Bad as e:
            raise ConfigError(f"{where}: {_dotted(here)}: {e}") from None


def _build(cls: type, values: Mapping[_Path, Any], path: _Path = ()) -> Any:
    kwargs: dict[str, Any] = {}
    for name, tp in _hints(cls).items():
        here = (*path, name)
        if _is_section(tp):
            kwargs[name] = _build(tp, values, here)
        elif here in values:
            kwargs[name] = values[here]
    return cls(**kwargs)


# --- environment ----------------------------------------------------------------------------------

_PREFIX = "OTELFLOW_"
_RESERVED = frozenset({"OTELFLOW_CONFIG"})

# Standard OpenTelemetry variables: (variable, dotted field path, parser; None = by the field's type).
_OTEL_ENV: tuple[tuple[str, str, Callable[[str], Any] | None], ...] = (
    ("OTEL_SERVICE_NAME", "export.service_name", None),
    ("OTEL_RESOURCE_ATTRIBUTES", "export.resource_attributes", None),
    ("OTEL_METRIC_EXPORT_INTERVAL", "export.interval", _millis),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "export.otlp.endpoint", None),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "export.otlp.protocol", None),
    ("OTEL_EXPORTER_OTLP_HEADERS", "export.otlp.headers", None),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", "export.otlp.compression", None),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "export.otlp.timeout", _millis),
    ("OTEL_EXPORTER_OTLP_CERTIFICATE", "export.otlp.certificate", None),
    ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "export.otlp.client_certificate", None),
    ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "export.otlp.client_key", None),
    ("OTEL_EXPORTER_OTLP_INSECURE", "export.otlp.insecure", None),
)


def _env_name(path: _Path) -> str:
    return _PREFIX + "__".join(p.upper() for p in path)


def _set_from_env(
    values: dict[_Path, Any], var: str, path: _Path, tp: Any, text: str, parse: Callable[[str], Any] | None
) -> None:
    try:
        if parse is None:
            value = _parse(tp, text, from_env=True)
        else:
            value = parse(text)
            for check in _split(tp)[1]:
                check(value)
    except _Bad as e:
        raise ConfigError(f"config error: {var}: {e}") from None
    if isinstance(value, dict):  # dicts from the environment merge into the layer below
        value = {**values.get(path, {}), **value}
    values[path] = value


def _apply_env(values: dict[_Path, Any], env: Mapping[str, str]) -> None:
    leaves = dict(_leaves(Config))
    by_var = {_env_name(path): (path, tp) for path, tp in leaves.items()}

    if env.get("NODE_NAME"):
        _set_from_env(values, "NODE_NAME", ("node_name",), leaves[("node_name",)], env["NODE_NAME"], None)

    for var in sorted(v for v in env if v.startswith(_PREFIX) and v not in _RESERVED):
        if var not in by_var:
            close = _closest(var.removeprefix(_PREFIX), [v.removeprefix(_PREFIX) for v in by_var])
            hint = f" (did you mean {_PREFIX}{close}?)" if close else ""
            raise ConfigError(f"config error: {var}: unknown setting{hint}")
        if env[var]:
            path, tp = by_var[var]
            _set_from_env(values, var, path, tp, env[var], None)

    for var, dotted, parse in _OTEL_ENV:
        if env.get(var):
            path = tuple(dotted.split("."))
            _set_from_env(values, var, path, leaves[path], env[var], parse)


# --- the file -------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _read_file(path: str, where: str) -> dict[Any, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: cannot read file: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: {line}malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level: expected a mapping of settings, got {type(data).__name__}")
    return data


# --- public API -----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if given), then ``env`` (default ``os.environ``).

    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    values: dict[_Path, Any] = {}
    if path is not None:
        where = f"config error in {os.fspath(path)}"
        _from_file(Config, _read_file(os.fspath(path), where), (), values, where)
    _apply_env(values, os.environ if env is None else env)
    cfg: Config = _build(Config, values)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as plain nested dicts (durations in seconds); loading it back gives ``cfg``.

    Note that ``export.otlp.headers`` may hold credentials.
    """
    return dataclasses.asdict(cfg)
