"""The demo's OTLP export: which collector the lab's agents export to, and a way for them to reach it.

The agents run in lab node namespaces, which reach neither the machine's loopback nor its network.
Each node gets a relay (otelflow/netlab/relay.py) listening inside its namespace on the collector's
own port, forwarding each connection from this process's namespace to the configured host and port.
The agents keep the configured URL unchanged (scheme, host, port, path; TLS and its server name go
end to end through the relay): a loopback address is the node's own loopback, another address is
added to the node's loopback, and a host name resolves to the node's loopback through the node's
hosts file (`ip netns exec` shows /etc/netns/<namespace>/hosts as /etc/hosts; removed on exit).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from otelflow.config import ConfigError, load_config
from otelflow.netlab import ns as nsu
from otelflow.netlab.relay import NamespaceRelay

# Per-signal endpoints (the OpenTelemetry exporter variables); with OTLP/HTTP they name the full URL.
SIGNAL_VARS = (
    ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "/v1/metrics"),
    ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "/v1/logs"),
)
DEMO_EXPORT_INTERVAL = "5s"  # unless the user set one: the demo is short
NETNS_ETC = Path("/etc/netns")


class ExportSetupError(Exception):
    """A one-line reason the demo cannot export as configured."""


@dataclass(frozen=True)
class ExportPlan:
    endpoint: str  # the URL the agents export to, as configured (per-signal path removed)
    protocol: str
    origin: str  # the variable (or file) it came from
    host: str
    port: int
    env: dict[str, str] = field(default_factory=dict)  # added to each agent's environment

    @property
    def listen_hosts(self) -> list[str]:
        """Where each node's relay listens: the endpoint's own address, or the loopbacks for a name."""
        return [self.host] if self.is_ip else ["127.0.0.1", "::1"]

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def describe(self) -> str:
        return f"{self.endpoint} (OTLP {self.protocol}, from {self.origin})"


def _signal_endpoint(env: Mapping[str, str], protocol: str) -> tuple[str, str]:
    """(base URL, variable) from the per-signal variables; both set must name one endpoint."""
    found: list[tuple[str, str]] = []
    for var, suffix in SIGNAL_VARS:
        v = env.get(var, "").strip()
        if v:
            base = v.rstrip("/")
            if protocol == "http/protobuf" and base.endswith(suffix):
                base = base[: -len(suffix)]
            found.append((base, var))
    if len({b for b, _ in found}) > 1:
        (a, va), (b, vb) = found
        raise ExportSetupError(
            f"{va}={a!r} and {vb}={b!r} differ: the agent exports metrics and logs to one endpoint"
        )
    return found[0] if found else ("", "")


def _listen_ports(*addrs: str) -> set[int]:
    out = set()
    for a in addrs:
        port = a.rsplit(":", 1)[-1] if a else ""
        if port.isdigit():
            out.add(int(port))
    return out


def plan_export(env: Mapping[str, str]) -> ExportPlan | None:
    """The endpoint the demo's agents would export to with this environment (None: no export).

    Raises ExportSetupError (one line) when the configuration is bad or the endpoint unusable."""
    conf = env.get("OTELFLOW_CONFIG") or None
    try:
        cfg = load_config(conf, env)
    except ConfigError as e:
        raise ExportSetupError(str(e)) from None
    otlp = cfg.export.otlp
    endpoint, origin = _signal_endpoint(env, otlp.protocol)
    if not endpoint:
        endpoint = otlp.endpoint
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            origin = "OTEL_EXPORTER_OTLP_ENDPOINT"
        elif env.get("OTELFLOW_EXPORT__OTLP__ENDPOINT"):
            origin = "OTELFLOW_EXPORT__OTLP__ENDPOINT"
        else:
            origin = f"export.otlp.endpoint in {conf}"
    if not endpoint:
        return None
    try:  # the agent's own check of the URL, with the variable the user set named in the error
        load_config(None, {"OTELFLOW_EXPORT__OTLP__ENDPOINT": endpoint})
    except ConfigError as e:
        raise ExportSetupError(f"{origin}: {str(e).split(': ', 2)[-1]}") from None
    u = urlsplit(endpoint)
    host = u.hostname or ""
    default = 4317 if otlp.protocol == "grpc" else (443 if u.scheme == "https" else 80)
    port = u.port or default
    if port in _listen_ports(cfg.api.listen, cfg.export.prometheus.listen):
        raise ExportSetupError(
            f"{origin}: port {port} is the agent's own api.listen or prometheus.listen port "
            "(the relay listens on the collector's port inside each node); use another port"
        )
    agent_env = {"OTELFLOW_EXPORT__OTLP__ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    if not env.get("OTEL_METRIC_EXPORT_INTERVAL") and not env.get("OTELFLOW_EXPORT__INTERVAL") and not conf:
        agent_env["OTELFLOW_EXPORT__INTERVAL"] = DEMO_EXPORT_INTERVAL
    return ExportPlan(endpoint, otlp.protocol, origin, host, port, agent_env)


def _hosts_file(netns: str, name: str) -> Path:
    """/etc/netns/<netns>/hosts: the name on the node's loopback, then the machine's own entries."""
    d = NETNS_ETC / netns
    d.mkdir(parents=True, exist_ok=True)
    try:
        own = Path("/etc/hosts").read_text()
    except OSError:
        own = "127.0.0.1 localhost\n::1 localhost\n"
    p = d / "hosts"
    p.write_text(
        f"# otelflow demo: {name} is relayed from this namespace\n127.0.0.1 {name}\n::1 {name}\n{own}"
    )
    return p


@contextlib.contextmanager
def export_relays(plan: ExportPlan, netns_names: list[str]) -> Iterator[list[NamespaceRelay]]:
    """A relay to the collector in each namespace (and the address or name it needs), all removed
    on exit."""
    relays: list[NamespaceRelay] = []
    made: list[Path] = []
    created_etc = not NETNS_ETC.exists()
    try:
        for netns in netns_names:
            if plan.is_ip and not ipaddress.ip_address(plan.host).is_loopback:
                bits = 32 if ipaddress.ip_address(plan.host).version == 4 else 128
                nsu.run(["ip", "-n", netns, "addr", "add", f"{plan.host}/{bits}", "dev", "lo"])
            if not plan.is_ip and plan.host != "localhost":
                made.append(_hosts_file(netns, plan.host))
            opened = 0
            for host in plan.listen_hosts:
                try:
                    relays.append(
                        NamespaceRelay(netns, plan.port, listen_host=host, target=(plan.host, plan.port))
                    )
                    opened += 1
                except OSError as e:
                    if host != "::1":  # the IPv6 loopback is a bonus for names (IPv6 may be off)
                        raise ExportSetupError(
                            f"cannot listen on {host}:{plan.port} in {netns}: {e.strerror or e}"
                        ) from None
            if not opened:
                raise ExportSetupError(f"cannot listen on port {plan.port} in {netns}")
        yield relays
    finally:
        for r in relays:
            r.close()
        for p in made:
            with contextlib.suppress(OSError):
                p.unlink()
            with contextlib.suppress(OSError):
                p.parent.rmdir()
        if created_etc:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()


def relay_failures(relays: list[NamespaceRelay]) -> tuple[int, int, str]:
    """(connections relayed, connections the collector refused or never answered, the last error)."""
    errs = [r.last_error for r in relays if r.last_error]
    return sum(r.accepted for r in relays), sum(r.failed for r in relays), errs[-1] if errs else ""
