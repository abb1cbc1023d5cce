"""`otelflow check`: a preflight report, one line per check, a remedy for every problem.

Exit code: 0 when every check passes, 1 when something only warns, 2 when something fails (a
configuration error is a failure too). ``--json`` prints the same results for machines.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from otelflow.config import Config

Status = Literal["pass", "warn", "fail", "skip"]
EXIT = {"pass": 0, "skip": 0, "warn": 1, "fail": 2}


@dataclass(slots=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    remedy: str = ""


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


def check_source(cfg: Config) -> list[CheckResult]:
    mode = cfg.source.mode
    if mode == "ebpf":
        return [
            CheckResult(
                "flow source",
                "fail",
                "source.mode=ebpf but the eBPF source is not available in this build",
                "set source.mode: auto or conntrack",
            )
        ]
    why = "requested" if mode == "conntrack" else "auto: the eBPF source is not built yet"
    return [CheckResult("flow source", "pass", f"conntrack ({why})")]


CHECKS: tuple[Callable[[Config], list[CheckResult]], ...] = (check_source, check_conntrack)


def run_checks(cfg: Config) -> list[CheckResult]:
    results = [CheckResult("configuration", "pass", "loaded and valid")]
    for check in CHECKS:
        results += check(cfg)
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
