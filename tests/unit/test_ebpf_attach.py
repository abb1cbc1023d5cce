"""The pure parts of the tcx attach backend: libbpf 1.1's option struct layouts, the config key, the
backend and readiness verdicts from probe outcomes, and how `otelflow check` shows the two attach
lines. (The probes and the backends themselves run against the real kernel in tests/kernel.)"""

from __future__ import annotations

import ctypes as C
import dataclasses
from pathlib import Path

import pytest

from otelflow import check as ck
from otelflow.config import Config, ConfigError, load_config
from otelflow.ebpf import features as ft
from otelflow.ebpf import libbpf as lb
from otelflow.ebpf.features import Probe


def test_libbpf_1_1_option_struct_layouts() -> None:
    # /usr/include/bpf/bpf.h of libbpf 1.1: a wrong sz or offset makes libbpf refuse the call
    # (non-zero bytes past what it knows) or read flags from the wrong place
    assert C.sizeof(lb.bpf_link_create_opts) == 64
    assert lb.bpf_link_create_opts.flags.offset == 8
    assert lb.bpf_link_create_opts.iter_info.offset == 16
    assert lb.bpf_link_create_opts.target_btf_id.offset == 28
    assert C.sizeof(lb.bpf_prog_query_opts) == 40
    assert lb.bpf_prog_query_opts.prog_ids.offset == 16
    assert lb.bpf_prog_query_opts.prog_cnt.offset == 24
    assert lb.bpf_prog_query_opts.prog_attach_flags.offset == 32
    assert (lb.BPF_TCX_INGRESS, lb.BPF_TCX_EGRESS, lb.BPF_F_BEFORE) == (46, 47, 8)


def test_attach_config_key(tmp_path: Path) -> None:
    assert Config().source.ebpf.attach == "auto"
    p = tmp_path / "a.yaml"
    p.write_text("source:\n  ebpf:\n    attach: TCX\n")
    assert load_config(str(p), env={}).source.ebpf.attach == "tcx"
    assert load_config(None, env={"OTELFLOW_SOURCE__EBPF__ATTACH": "tc"}).source.ebpf.attach == "tc"
    p.write_text("source:\n  ebpf:\n    attach: xdp\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(p), env={})
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == f"config error in {p}: source.ebpf.attach: expected one of 'auto', 'tcx', 'tc', got 'xdp'"


BTF = Probe("kernel BTF", True, "ok")
BPF = Probe("bpf() permitted", True, "ok")
TC_OK = Probe("tc attach", True, "clsact ok")
TC_BAD = Probe("tc attach", False, "lo: EPERM", "grant")
TCX_OK = Probe("tcx attach", True, "tcx ok")
TCX_BAD = Probe("tcx attach", False, "lo: bpf_link_create(BPF_TCX_INGRESS): Invalid argument", "6.6")


@pytest.mark.parametrize(
    ("attach", "tc", "tcx", "backend", "ok", "reason"),
    [
        ("auto", TC_OK, TCX_OK, "tcx", True, ""),
        ("auto", TC_OK, TCX_BAD, "tc", True, ""),
        ("auto", TC_BAD, TCX_OK, "tcx", True, ""),
        ("auto", TC_BAD, TCX_BAD, "", False, "tc attach: lo: EPERM (and 1 more)"),
        ("tcx", TC_OK, TCX_OK, "tcx", True, ""),
        ("tcx", TC_OK, TCX_BAD, "", False, f"tcx attach: {TCX_BAD.detail}"),
        ("tc", TC_OK, TCX_BAD, "tc", True, ""),
        ("tc", TC_BAD, TCX_OK, "", False, "tc attach: lo: EPERM"),
    ],
)
def test_backend_and_readiness(
    attach: str, tc: Probe, tcx: Probe, backend: str, ok: bool, reason: str
) -> None:
    probes = [BTF, BPF, tc, tcx]
    assert ft.attach_backend(attach, probes) == backend
    got_ok, got_reason, got_probes = ft.readiness_of(probes, attach)
    assert (got_ok, got_probes) == (ok, probes)
    assert got_reason == (reason or "kernel BTF, bpf() and TC attach all work")


def test_a_failed_load_fails_readiness_whatever_the_backend() -> None:
    bad = Probe("bpf() permitted", False, "EPERM")
    assert ft.readiness_of([BTF, bad, TC_OK, TCX_OK], "auto")[:2] == (False, "bpf() permitted: EPERM")


def cfg(mode: str = "auto", attach: str = "auto") -> Config:
    c = Config()
    ebpf = dataclasses.replace(c.source.ebpf, attach=attach)  # type: ignore[arg-type]
    return dataclasses.replace(c, source=dataclasses.replace(c.source, mode=mode, ebpf=ebpf))  # type: ignore[arg-type]


def lines(c: Config, probes: list[Probe]) -> dict[str, ck.CheckResult]:
    return {r.name: r for r in ck.check_ebpf(c, ft.readiness_of(probes, c.source.ebpf.attach))}


def test_check_lines_auto_with_tcx() -> None:
    r = lines(cfg(), [BTF, BPF, TC_OK, TCX_OK])
    assert (r["tcx attach"].status, r["tcx attach"].detail) == (
        "pass",
        "tcx ok; the eBPF source attaches with tcx",
    )
    assert (r["tc attach"].status, r["tc attach"].detail) == (
        "pass",
        "clsact ok (not used: the eBPF source attaches with tcx)",
    )


def test_check_lines_auto_without_tcx_is_no_problem() -> None:
    r = lines(cfg(), [BTF, BPF, TC_OK, TCX_BAD])
    assert r["tc attach"].status == "pass" and r["tc attach"].detail.endswith("attaches with tc")
    assert r["tcx attach"].status == "skip"
    assert (
        r["tcx attach"].detail
        == f"unavailable: {TCX_BAD.detail} (not used: the eBPF source attaches with tc)"
    )
    assert ck.exit_code(list(r.values())) == 0


def test_check_lines_forced_tcx_without_tcx() -> None:
    r = lines(cfg(mode="ebpf", attach="tcx"), [BTF, BPF, TC_OK, TCX_BAD])
    assert (r["tcx attach"].status, r["tcx attach"].remedy) == ("fail", "6.6")
    assert r["tc attach"].status == "pass" and "(not used: source.ebpf.attach=tcx)" in r["tc attach"].detail


def test_check_lines_neither_works_warns_on_both_in_auto() -> None:
    r = lines(cfg(), [BTF, BPF, TC_BAD, TCX_BAD])
    assert (r["tc attach"].status, r["tcx attach"].status) == ("warn", "warn")
    r = lines(cfg(mode="conntrack"), [BTF, BPF, TC_BAD, TCX_BAD])
    assert (r["tc attach"].status, r["tcx attach"].status) == ("skip", "skip")
