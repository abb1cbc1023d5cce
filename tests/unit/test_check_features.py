"""The pure parts of `otelflow check` and of the eBPF feature probes: CapEff and kernel-release
parsing, what each capability set means per kernel, BTF header validation, the source choice, the
status a failed probe gets per source.mode, the RBAC summary line, rendering and exit codes. (The
probes themselves run against the real kernel in tests/kernel/test_check.py.)"""

from __future__ import annotations

import dataclasses
import struct

import pytest

from otelflow import check as ck
from otelflow.config import Config, KubernetesConfig, MetadataConfig, SourceConfig
from otelflow.ebpf import features as ft
from otelflow.ebpf.features import Probe
from otelflow.k8s.cache import RBAC_RULES

STATUS = """Name:\tpython3
Umask:\t0022
CapInh:\t0000000000000000
CapPrm:\t000001fffeffffff
CapEff:\t000001fffeffffff
CapBnd:\t000001fffeffffff
"""
ALL = 0x000001FFFEFFFFFF  # everything but CAP_SYS_RESOURCE (this machine's root)


def bits(*caps: int) -> int:
    return sum(1 << c for c in caps)


def by_name(probes: list[Probe]) -> dict[str, Probe]:
    return {p.name: p for p in probes}


# ---- parsing ----------------------------------------------------------------------------------------


def test_parse_capeff() -> None:
    assert ft.parse_capeff(STATUS) == ALL
    assert ft.parse_capeff("CapEff:\t0000000000003000\n") == bits(12, 13)
    with pytest.raises(ValueError, match="no CapEff"):
        ft.parse_capeff("CapPrm:\t0000000000003000\n")
    with pytest.raises(ValueError):
        ft.parse_capeff("CapEff:\tzz\n")


def test_parse_release() -> None:
    assert ft.parse_release("6.18.44-fc-v657") == (6, 18)
    assert ft.parse_release("5.4.0-150-generic") == (5, 4)
    with pytest.raises(ValueError, match="no version number"):
        ft.parse_release("custom")


# ---- capabilities ---------------------------------------------------------------------------------


def test_capabilities_all_present_on_a_new_kernel() -> None:
    ps = by_name(ft.capability_probes(ALL, 40, (6, 18)))
    assert list(ps) == ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE"]
    assert all(p.ok for p in ps.values())
    assert ps["CAP_SYS_RESOURCE"].detail.startswith("absent; not needed: kernel 6.18")


def test_capabilities_none() -> None:
    ps = by_name(ft.capability_probes(0, 40, (6, 1)))
    assert [n for n, p in ps.items() if not p.ok] == ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
    assert ps["CAP_BPF"].remedy == "add CAP_BPF to the DaemonSet's securityContext.capabilities.add"
    assert "TCP health" in ps["CAP_PERFMON"].detail
    assert "conntrack source" in ps["CAP_NET_ADMIN"].detail


def test_sys_admin_stands_in_for_bpf_and_perfmon() -> None:
    ps = by_name(ft.capability_probes(bits(ft.CAP_SYS_ADMIN, ft.CAP_NET_ADMIN), 40, (6, 1)))
    assert ps["CAP_BPF"].ok and ps["CAP_BPF"].detail.startswith("via CAP_SYS_ADMIN")
    assert ps["CAP_PERFMON"].ok


def test_old_kernel_needs_sys_admin_and_memlock() -> None:
    # 5.4: no CAP_BPF/CAP_PERFMON (cap_last_cap 37), BPF maps count against RLIMIT_MEMLOCK
    ps = by_name(ft.capability_probes(bits(ft.CAP_NET_ADMIN), 37, (5, 4)))
    assert list(ps) == ["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE"]
    assert not ps["CAP_SYS_ADMIN"].ok and "upgrade the kernel" in ps["CAP_SYS_ADMIN"].remedy
    assert not ps["CAP_SYS_RESOURCE"].ok and "RLIMIT_MEMLOCK" in ps["CAP_SYS_RESOURCE"].detail
    ps = by_name(ft.capability_probes(bits(ft.CAP_NET_ADMIN), 37, (5, 4), memlock_unlimited=True))
    assert ps["CAP_SYS_RESOURCE"].ok and "already unlimited" in ps["CAP_SYS_RESOURCE"].detail
    ps = by_name(ft.capability_probes(bits(ft.CAP_SYS_ADMIN, ft.CAP_SYS_RESOURCE), 37, (5, 10)))
    assert ps["CAP_SYS_ADMIN"].ok and ps["CAP_SYS_RESOURCE"].ok


# ---- BTF header ---------------------------------------------------------------------------------------


def btf(
    magic: int = 0xEB9F, version: int = 1, type_len: int = 100, str_len: int = 50, endian: str = "<"
) -> bytes:
    return struct.pack(f"{endian}HBBIIIII", magic, version, 0, 24, 0, type_len, type_len, str_len)


def test_btf_header() -> None:
    h = ft.parse_btf_header(btf(), 24 + 150)
    assert (h.version, h.hdr_len, h.type_len, h.str_len) == (1, 24, 100, 50)
    assert ft.parse_btf_header(btf(endian=">"), 174).type_len == 100  # the other byte order
    for data, size, msg in (
        (btf()[:10], 174, "too short"),
        (btf(magic=0x1234), 174, "bad magic"),
        (btf(version=2), 174, "BTF version 2"),
        (btf(), 173, "past the end"),
        (btf(type_len=0), 174, "no types"),
    ):
        with pytest.raises(ValueError, match=msg):
            ft.parse_btf_header(data, size)


# ---- source choice --------------------------------------------------------------------------------

READY = (True, "kernel BTF, bpf() and TC attach all work", [Probe("kernel BTF", True, "ok")])
NOT_READY = (False, "bpf() permitted: EPERM", [Probe("bpf() permitted", False, "EPERM", "grant CAP_BPF")])


def test_choose_source() -> None:
    assert ft.choose_source("conntrack", readiness=NOT_READY) == (
        "conntrack",
        "requested (source.mode=conntrack)",
    )
    assert ft.choose_source("auto", readiness=READY) == (
        "ebpf",
        "auto: kernel BTF, bpf() and TC attach all work",
    )
    assert ft.choose_source("auto", readiness=NOT_READY) == (
        "conntrack",
        "auto: eBPF unavailable (bpf() permitted: EPERM)",
    )
    assert ft.choose_source("ebpf", readiness=READY)[0] == "ebpf"
    with pytest.raises(ft.SourceUnavailable, match=r"cannot run here: bpf\(\) permitted: EPERM"):
        ft.choose_source("ebpf", readiness=NOT_READY)
    with pytest.raises(ValueError, match="must be one of auto, ebpf, conntrack"):
        ft.choose_source("bcc", readiness=READY)


# ---- check lines ----------------------------------------------------------------------------------


def cfg(mode: str = "auto", kube: str = "auto", kubeconfig: str = "") -> Config:
    return dataclasses.replace(
        Config(),
        source=SourceConfig(mode=mode),  # type: ignore[arg-type]
        metadata=MetadataConfig(kubernetes=KubernetesConfig(enabled=kube, kubeconfig=kubeconfig)),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("mode", "status"), [("auto", "warn"), ("ebpf", "fail"), ("conntrack", "skip")])
def test_failed_ebpf_probe_status_per_mode(mode: str, status: str) -> None:
    [line] = ck.check_ebpf(cfg(mode), NOT_READY)
    assert (line.name, line.status, line.remedy) == ("bpf() permitted", status, "grant CAP_BPF")
    if mode == "conntrack":
        assert line.detail == "not used with source.mode=conntrack: EPERM"
    [ok] = ck.check_ebpf(cfg(mode), READY)
    assert ok.status == "pass"


def test_source_line() -> None:
    [line] = ck.check_source(cfg("ebpf"), NOT_READY)
    assert line.status == "fail" and "source.mode: auto" in line.remedy
    [line] = ck.check_source(cfg("auto"), NOT_READY)
    assert (line.status, line.detail) == (
        "pass",
        "conntrack (auto: eBPF unavailable (bpf() permitted: EPERM))",
    )


def test_rbac_requests_and_denied_summary() -> None:
    wanted = ck.rbac_requests(RBAC_RULES)
    assert len(wanted) == 18 and len(set(wanted)) == 18
    assert ("", "pods", "list") in wanted and ("discovery.k8s.io", "endpointslices", "watch") in wanted
    assert ck.denied_summary([("", "pods", "list")]) == "list pods"
    assert (
        ck.denied_summary([("", "pods", "list"), ("", "pods", "watch"), ("apps", "replicasets", "get")])
        == "list,watch pods; get apps/replicasets"
    )


def test_kubernetes_off_and_bad_kubeconfig(tmp_path: object) -> None:
    [line] = ck.check_kubernetes(cfg(kube="false"))
    assert (line.status, line.detail) == ("skip", "not used (metadata.kubernetes.enabled=false)")
    [line] = ck.check_kubernetes(cfg(kube="auto", kubeconfig="/nonexistent/kubeconfig"))
    assert line.status == "fail" and line.detail.startswith("kubeconfig /nonexistent/kubeconfig: ")
    assert "metadata.kubernetes.enabled: false" in line.remedy


def test_collector_without_endpoint_passes() -> None:
    [line] = ck.check_collector(Config())
    assert (line.status, line.detail) == (
        "pass",
        "no endpoint configured (export.otlp.endpoint): OTLP export off",
    )


def test_render_and_exit_code() -> None:
    rs = [
        ck.CheckResult("configuration", "pass", "loaded and valid"),
        ck.CheckResult("tc attach", "warn", "EPERM", "grant CAP_BPF"),
        ck.CheckResult("kubernetes API", "skip", "not used", "ignored remedy"),
    ]
    assert ck.render(rs).splitlines() == [
        "PASS  configuration   loaded and valid",
        "WARN  tc attach       EPERM -- remedy: grant CAP_BPF",
        "SKIP  kubernetes API  not used",
    ]
    assert ck.exit_code(rs) == 1
    assert ck.exit_code([*rs, ck.CheckResult("collector", "fail", "x", "y")]) == 2
    assert ck.exit_code([rs[0], rs[2]]) == 0


def test_tcp_health_disabled_is_skipped() -> None:
    c = Config()
    c = dataclasses.replace(
        c, source=dataclasses.replace(c.source, ebpf=dataclasses.replace(c.source.ebpf, tcp_health=False))
    )
    assert ck.check_tcp_health(c) == [
        ck.CheckResult("TCP health hooks", "skip", "disabled (source.ebpf.tcp_health=false)")
    ]


def test_tcp_health_line_names() -> None:
    assert ck._health_name("TCP health: rtt") == "TCP health: rtt"
    assert ck._health_name("rtt") == "TCP health: rtt"
