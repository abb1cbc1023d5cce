"""`otelflow check`: a preflight report, one line per check, a remedy for every problem.

Lines, in order: configuration; the eBPF probes (kernel BTF, bpf() permitted, tc attach, tcx
attach: see otelflow/ebpf/features.py; the attach backend source.ebpf.attach does not need is
only reported); the TCP-health hooks; the capabilities each source needs; the flow
source the agent would choose and why; conntrack (present, accounting, table fill, dump, events);
the Kubernetes API (reachable, RBAC sufficient through SelfSubjectAccessReview); the collector
(an empty OTLP export through the agent's own exporter).

What a failed eBPF probe means depends on ``source.mode``: with ``ebpf`` it is a failure, with
``auto`` a warning (the agent falls back to conntrack), with ``conntrack`` it is only reported
(status ``skip``).

Exit code: 0 when every check passes (or is skipped), 1 when something only warns, 2 when
something fails (a configuration error is a failure too). ``--json`` prints the same results for
machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import ssl
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from otelflow.config import Config, Duration, OtlpConfig
from otelflow.ebpf.features import Probe

Readiness = tuple[bool, str, list[Probe]]

Status = Literal["pass", "warn", "fail", "skip"]
EXIT = {"pass": 0, "skip": 0, "warn": 1, "fail": 2}
KUBE_CONNECT_TIMEOUT = 5.0
KUBE_READ_TIMEOUT = 10.0
OTLP_CHECK_TIMEOUT = 5.0  # at most this long for the empty export (export.otlp.timeout if shorter)


@dataclass(slots=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    remedy: str = ""


def _probe_line(p: Probe, name: str, failed: Status, mode: str) -> CheckResult:
    """A probe as a report line: ``failed`` is the status of a failed probe, except that with
    source.mode=conntrack an eBPF-only problem is reported as skip."""
    if p.ok:
        return CheckResult(name, "pass", p.detail)
    if mode == "conntrack" and failed != "fail":
        return CheckResult(name, "skip", f"not used with source.mode=conntrack: {p.detail}", p.remedy)
    return CheckResult(name, failed, p.detail, p.remedy)


def _ebpf_status(mode: str) -> Status:
    return "fail" if mode == "ebpf" else "warn"


# ---- eBPF ------------------------------------------------------------------------------------------


def check_ebpf(cfg: Config, readiness: Readiness) -> list[CheckResult]:
    from otelflow.ebpf.features import attach_backend

    mode = cfg.source.mode
    attach = cfg.source.ebpf.attach
    status: Status = "skip" if mode == "conntrack" else _ebpf_status(mode)
    backend = attach_backend(attach, readiness[2])  # "" when the one needed fails
    needed = attach if attach != "auto" else backend
    out = []
    for p in readiness[2]:
        kind = p.name.removesuffix(" attach") if p.name in ("tc attach", "tcx attach") else ""
        if kind and needed and kind != needed:  # the other backend: reported, never a problem
            why = f"the eBPF source attaches with {needed}"
            if attach != "auto":
                why = f"source.ebpf.attach={attach}"
            detail = p.detail if p.ok else f"unavailable: {p.detail}"
            out.append(CheckResult(p.name, "pass" if p.ok else "skip", f"{detail} (not used: {why})"))
            continue
        line = _probe_line(p, p.name, status, mode)
        if kind and p.ok and mode != "conntrack":
            line.detail += f"; the eBPF source attaches with {kind}"
        out.append(line)
    return out


def check_tcp_health(cfg: Config) -> list[CheckResult]:
    """One line per TCP-health feature, from otelflow.ebpf.health.probe_hooks() (which hook each
    would use, or why none)."""
    mode = cfg.source.mode
    if not cfg.source.ebpf.tcp_health:
        return [CheckResult("TCP health hooks", "skip", "disabled (source.ebpf.tcp_health=false)")]
    try:
        from otelflow.ebpf.health import probe_hooks
    except ImportError:
        return [CheckResult("TCP health hooks", "skip", "TCP health is not part of this build")]
    try:
        probes = probe_hooks()
    except Exception as e:  # a probe must never take the whole report down
        return [
            CheckResult(
                "TCP health hooks",
                "warn",
                f"probing the hooks failed: {e}",
                "report this as a bug with the output of 'otelflow check --json'",
            )
        ]
    out = [_probe_line(p, _health_name(p.name), "warn", mode) for p in probes]
    return out or [CheckResult("TCP health hooks", "skip", "no TCP-health features to probe")]


def _health_name(name: str) -> str:
    return name if name.lower().startswith("tcp health") else f"TCP health: {name}"


def check_capabilities(cfg: Config) -> list[CheckResult]:
    from otelflow.ebpf.features import probe_capabilities

    mode = cfg.source.mode
    out = []
    for p in probe_capabilities():
        # CAP_NET_ADMIN is needed by both sources; the rest only by eBPF (and TCP health)
        failed: Status = "fail" if p.name in ("CAP_NET_ADMIN", "capabilities") else _ebpf_status(mode)
        if p.name == "CAP_PERFMON" and failed == "fail":
            failed = "warn"  # TCP health only: the flow source runs without it
        out.append(_probe_line(p, f"capability {p.name}", failed, mode))
    return out


def check_source(cfg: Config, readiness: Readiness) -> list[CheckResult]:
    from otelflow.ebpf.features import SourceUnavailable, choose_source

    try:
        name, why = choose_source(cfg.source.mode, readiness=readiness)
    except SourceUnavailable as e:
        return [
            CheckResult(
                "flow source",
                "fail",
                f"source.mode=ebpf: {e}",
                "fix the eBPF lines above, or set source.mode: auto (falls back to conntrack) or conntrack",
            )
        ]
    return [CheckResult("flow source", "pass", f"{name} ({why})")]


# ---- conntrack -------------------------------------------------------------------------------------


def check_conntrack(cfg: Config) -> list[CheckResult]:
    from otelflow.conntrack import netlink as nl
    from otelflow.conntrack.source import ACCT_REMEDY, accounting_enabled, table_fill

    out: list[CheckResult] = []
    acct = accounting_enabled()
    if acct is None:
        out.append(
            CheckResult(
                "conntrack present",
                "fail",
                "no netfilter conntrack in this network namespace",
                "load nf_conntrack; run the agent in the node's network namespace (hostNetwork: true)",
            )
        )
        return out
    out.append(CheckResult("conntrack present", "pass", "netfilter conntrack is available"))
    if acct:
        out.append(
            CheckResult("conntrack accounting", "pass", "nf_conntrack_acct=1: bytes and packets are counted")
        )
    elif cfg.source.conntrack.enable_acct:
        out.append(
            CheckResult(
                "conntrack accounting",
                "warn",
                "nf_conntrack_acct=0; the agent will turn it on at start (source.conntrack.enable_acct)",
                "entries created before it is on never get counters",
            )
        )
    else:
        out.append(
            CheckResult(
                "conntrack accounting", "warn", "nf_conntrack_acct=0: no bytes or packets", ACCT_REMEDY
            )
        )
    fill = table_fill()
    if fill:
        used, cap = fill
        pct = 100.0 * used / cap if cap else 0.0
        status: Status = "pass" if pct < 90 else "warn"
        out.append(
            CheckResult(
                "conntrack table fill",
                status,
                f"{used} of {cap} entries ({pct:.0f}%)",
                ""
                if status == "pass"
                else "raise net.netfilter.nf_conntrack_max: a full table drops new connections",
            )
        )
    try:
        entries = nl.dump()
        out.append(CheckResult("conntrack dump", "pass", f"read {len(entries)} entries over ctnetlink"))
    except OSError as e:
        out.append(
            CheckResult(
                "conntrack dump",
                "fail",
                f"ctnetlink dump refused: {e.strerror or e}",
                "the agent needs CAP_NET_ADMIN (see the DaemonSet's securityContext)",
            )
        )
    try:
        with nl.EventSocket(rcvbuf=cfg.source.conntrack.event_buffer_bytes):
            pass
        out.append(CheckResult("conntrack events", "pass", "subscribed to NEW and DESTROY events"))
    except OSError as e:
        out.append(
            CheckResult(
                "conntrack events",
                "fail",
                f"cannot subscribe to conntrack events: {e.strerror or e}",
                "the agent needs CAP_NET_ADMIN; flows closing between polls would be missed",
            )
        )
    return out


# ---- Kubernetes ------------------------------------------------------------------------------------

SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


def rbac_requests(rules: Iterable[dict[str, list[str]]]) -> list[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every permission in RBAC rules, in rule order."""
    return [
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    ]


def denied_summary(denied: Sequence[tuple[str, str, str]]) -> str:
    """One line naming denied permissions, verbs grouped per resource: 'list,watch pods; get
    apps/replicasets'."""
    by: dict[str, list[str]] = {}
    for group, res, verb in denied:
        by.setdefault(f"{group}/{res}" if group else res, []).append(verb)
    return "; ".join(f"{','.join(verbs)} {res}" for res, verbs in by.items())


def check_kubernetes(cfg: Config) -> list[CheckResult]:
    from otelflow.k8s.cache import RBAC_RULES, client_from_config
    from otelflow.k8s.client import KubeConfigError, KubeError

    kube = cfg.metadata.kubernetes
    try:
        client = client_from_config(kube.enabled, kube.kubeconfig)
    except KubeConfigError as e:
        return [
            CheckResult(
                "kubernetes API",
                "fail",
                str(e),
                "fix metadata.kubernetes.kubeconfig, run the agent in a pod with its ServiceAccount token, "
                "or set metadata.kubernetes.enabled: false",
            )
        ]
    if client is None:
        why = (
            "metadata.kubernetes.enabled=false"
            if kube.enabled == "false"
            else "metadata.kubernetes.enabled=auto: no kubeconfig and not in a pod"
        )
        return [CheckResult("kubernetes API", "skip", f"not used ({why})")]
    client.connect_timeout, client.read_timeout = KUBE_CONNECT_TIMEOUT, KUBE_READ_TIMEOUT
    where = f"{client.server} ({client.config.source})"
    out: list[CheckResult] = []
    try:
        try:
            info = client.get("/version") or {}
            out.append(
                CheckResult("kubernetes API", "pass", f"{where} reachable, {info.get('gitVersion', '?')}")
            )
        except KubeError as e:
            if e.status is None:
                out.append(
                    CheckResult(
                        "kubernetes API",
                        "fail",
                        str(e),
                        "check the server address in the kubeconfig (or the in-cluster "
                        "KUBERNETES_SERVICE_HOST), that the API server runs, and that network "
                        "policies let the node reach it",
                    )
                )
                out.append(
                    CheckResult("kubernetes RBAC", "skip", "not checked: the API server is unreachable")
                )
                return out
            if e.status == 401:
                out.append(
                    CheckResult(
                        "kubernetes API",
                        "fail",
                        str(e),
                        "the credentials were rejected: renew the kubeconfig's token (or client certificate)",
                    )
                )
                out.append(CheckResult("kubernetes RBAC", "skip", "not checked: not authenticated"))
                return out
            out.append(CheckResult("kubernetes API", "pass", f"{where} reachable (GET /version: {e.status})"))
        out.append(_check_rbac(client, rbac_requests(RBAC_RULES)))
    finally:
        client.close()
    return out


def _check_rbac(client: Any, wanted: list[tuple[str, str, str]]) -> CheckResult:
    from otelflow.k8s.client import KubeError

    denied: list[tuple[str, str, str]] = []
    try:
        for group, res, verb in wanted:
            review = client.request(
                "POST",
                SSAR_PATH,
                {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": {"group": group, "resource": res, "verb": verb}},
                },
            )
            if not (review or {}).get("status", {}).get("allowed"):
                denied.append((group, res, verb))
    except KubeError as e:
        return CheckResult(
            "kubernetes RBAC",
            "fail",
            f"SelfSubjectAccessReview failed: {e}",
            "the API server must serve authorization.k8s.io/v1 and let the agent create "
            "selfsubjectaccessreviews (the default system:basic-user role does)",
        )
    if denied:
        return CheckResult(
            "kubernetes RBAC",
            "fail",
            f"denied: {denied_summary(denied)}; the metadata cache cannot name flows without them",
            "bind the agent's ServiceAccount to a ClusterRole with get, list and watch on nodes, pods, "
            "services, apps/replicasets, batch/jobs and discovery.k8s.io/endpointslices (RBAC_RULES)",
        )
    return CheckResult(
        "kubernetes RBAC",
        "pass",
        f"all {len(wanted)} permissions the metadata cache needs are allowed (SelfSubjectAccessReview)",
    )


# ---- collector -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Keep a logger's warnings off stderr for the block: the check reports the failure itself."""
    lg = logging.getLogger(logger_name)
    was = lg.disabled
    lg.disabled = True
    try:
        yield
    finally:
        lg.disabled = was


def check_collector(cfg: Config) -> list[CheckResult]:
    """An empty ExportMetricsServiceRequest through the agent's own exporter (same transport, TLS,
    headers and compression as the agent would use), sent once, no retries."""
    from otelflow.otlp.exporter import Item, OtlpExporter

    otlp = cfg.export.otlp
    if not otlp.endpoint:
        return [
            CheckResult("collector", "pass", "no endpoint configured (export.otlp.endpoint): OTLP export off")
        ]
    otlp = dataclasses.replace(otlp, timeout=Duration(min(float(otlp.timeout), OTLP_CHECK_TIMEOUT)))
    where = f"{otlp.endpoint} ({otlp.protocol})"
    remedy = (
        "check export.otlp.endpoint and export.otlp.protocol (gRPC: port 4317, http/protobuf: 4318), "
        "that the collector's OTLP receiver listens there and the node can reach it, and the TLS "
        "(export.otlp.certificate, insecure) and header settings"
    )
    t0 = time.perf_counter()
    with _quiet("otelflow.otlp.exporter"):
        try:
            exp = OtlpExporter(otlp, max_retry_time=0.0)
        except Exception as e:  # bad certificate paths, a malformed endpoint, ...
            return [CheckResult("collector", "fail", f"{where}: cannot set up the exporter: {e}", remedy)]
        try:
            exp.submit([Item("metrics", b"", 0)])
            exp.flush(float(otlp.timeout) + 5.0)
        finally:
            exp.close(1.0)
    st = exp.stats
    ms = (time.perf_counter() - t0) * 1000
    if st.requests >= 1 and st.failed_requests == 0:
        return [CheckResult("collector", "pass", f"{where} accepted an empty metrics export in {ms:.0f} ms")]
    why = st.last_error
    if otlp.protocol == "grpc":  # gRPC says only UNAVAILABLE: find out whether TCP or TLS is the problem
        why += f"; {grpc_diagnosis(otlp)}"
    return [CheckResult("collector", "fail", f"{where}: empty metrics export failed: {why}", remedy)]


def grpc_diagnosis(otlp: OtlpConfig) -> str:
    """Why a gRPC export may have failed, in a few words: a TCP connect to the endpoint and, for
    TLS, a handshake with the same CA and client certificate (gRPC's own error says only
    UNAVAILABLE). Only explains a failure the exporter already saw."""
    ep = otlp.endpoint
    u = urlsplit(ep if "://" in ep else f"http://{ep}")
    host, port = u.hostname or "localhost", u.port or 4317
    timeout = float(otlp.timeout)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return f"TCP connect to {host}:{port}: {e.strerror or e}"
    with sock:
        if otlp.insecure or u.scheme == "http":
            return f"TCP connect to {host}:{port} works: is it an OTLP/gRPC port without TLS?"
        try:
            ctx = ssl.create_default_context(cafile=otlp.certificate or None)
            ctx.set_alpn_protocols(["h2"])
            if otlp.client_certificate:
                ctx.load_cert_chain(otlp.client_certificate, otlp.client_key or None)
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                tls.settimeout(min(timeout, 1.0))
                with contextlib.suppress(TimeoutError):
                    tls.recv(1)  # a refused client certificate shows up as an alert after the handshake
        except ssl.SSLError as e:
            return f"TLS with {host}:{port}: {e.reason or e}"
        except OSError as e:
            return f"TLS with {host}:{port}: {e.strerror or e}"
    return f"TCP and TLS with {host}:{port} work"


# ---- the report ------------------------------------------------------------------------------------


def run_checks(cfg: Config, netns: str | None = None) -> list[CheckResult]:
    from otelflow.ebpf.features import ebpf_readiness

    readiness = ebpf_readiness(netns, cfg.source.ebpf.attach)
    results = [CheckResult("configuration", "pass", "loaded and valid")]
    results += check_ebpf(cfg, readiness)
    results += check_tcp_health(cfg)
    results += check_capabilities(cfg)
    results += check_source(cfg, readiness)
    results += check_conntrack(cfg)
    results += check_kubernetes(cfg)
    results += check_collector(cfg)
    return results


def exit_code(results: list[CheckResult]) -> int:
    return max((EXIT[r.status] for r in results), default=0)


def render(results: list[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        line = f"{r.status.upper():<4}  {r.name:<{width}}  {r.detail}"
        if r.remedy and r.status in ("warn", "fail"):
            line += f" -- remedy: {r.remedy}"
        lines.append(line)
    return "\n".join(lines)


def main(cfg: Config, as_json: bool) -> int:
    results = run_checks(cfg)
    code = exit_code(results)
    if as_json:
        verdict = {0: "pass", 1: "warn", 2: "fail"}[code]
        print(json.dumps({"result": verdict, "checks": [asdict(r) for r in results]}, indent=2))
    else:
        print(render(results))
    sys.stdout.flush()
    return code
