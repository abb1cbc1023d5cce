"""`otelflow demo` with OTEL_EXPORTER_OTLP_ENDPOINT set: its agents, inside lab node namespaces,
export through a relay in each node to a real collector on this machine's loopback (OTLP gRPC); the
flow bytes in the collector's flow logs equal what the demo reports as the kernel's own count, and
the lab, the relays and their namespace files are gone afterwards."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from otelflow.demo_otlp import NETNS_ETC
from otelflow.netlab.lab import list_labs
from tests.e2e.components import Collector


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackCollector(Collector):
    """The collector on this namespace's 127.0.0.1 (where a user's local collector would be), on
    free ports (other tests may run collectors at the same time); flow logs to the file exporter."""

    def __init__(self, binary: str, workdir: Path) -> None:
        super().__init__(binary, "", "127.0.0.1", workdir)
        self.grpc_port, health = free_port(), free_port()
        self.health = f"http://127.0.0.1:{health}/"
        cfg: dict[str, Any] = {
            "extensions": {"health_check": {"endpoint": f"127.0.0.1:{health}"}},
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{self.grpc_port}"}}}},
            "exporters": {
                "file": {"path": str(self.logs_file)},
                "file/metrics": {"path": str(workdir / "metrics.jsonl")},
            },
            "service": {
                "extensions": ["health_check"],
                "telemetry": {"metrics": {"level": "none"}},
                "pipelines": {
                    "metrics": {"receivers": ["otlp"], "exporters": ["file/metrics"]},
                    "logs": {"receivers": ["otlp"], "exporters": ["file"]},
                },
            },
        }
        self.config.write_text(yaml.safe_dump(cfg))

    def start(self) -> None:
        out = open(self.workdir / "collector.out", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([self.binary, "--config", str(self.config)], stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.health, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"collector not healthy: {(self.workdir / 'collector.out').read_text()[-2000:]}")


def test_demo_exports_exact_flow_bytes_over_otlp(collector_bin: str, tmp_path: Path) -> None:
    tag = os.environ.get("OFL_LAB_TAG", "")
    before = {lab for lab in list_labs() if lab.startswith(tag)}
    etc_before = set(os.listdir(NETNS_ETC)) if NETNS_ETC.exists() else set()
    col = LoopbackCollector(collector_bin, tmp_path)
    col.start()
    try:
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://localhost:{col.grpc_port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
        env.pop("OTELFLOW_EXPORT__OTLP__ENDPOINT", None)
        p = subprocess.run(
            [sys.executable, "-m", "otelflow", "demo", "--duration", "5"],
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        time.sleep(1.0)  # the file exporter writes what it received
    finally:
        col.stop()
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    assert (
        f"exporting to http://localhost:{col.grpc_port} (OTLP grpc, from OTEL_EXPORTER_OTLP_ENDPOINT)" in out
    )
    assert re.search(r"node-a: flow source (ebpf|conntrack) ", out), out[:2000]
    m = re.search(
        r"(\d+) flows; the agents counted ([\d,]+) bytes.*\n.*say ([\d,]+) bytes \(0\.000% apart\)", out
    )
    assert m, out[-1500:]
    flows, kernel = int(m.group(1)), int(m.group(3).replace(",", ""))

    # the lab's flows in the flow logs (the agents' own export, over each node's loopback, is not one)
    recs = [
        r
        for r in col.log_records()
        if not str(r.get("client.address", "")).startswith(("127.", "::1"))
        and r.get("network.transport") in ("tcp", "udp")
    ]
    exported = sum(r.get("otelflow.flow.bytes.c2s", 0) + r.get("otelflow.flow.bytes.s2c", 0) for r in recs)
    assert exported == kernel, (exported, kernel, flows)
    assert len({(r["network.transport"], r["client.port"]) for r in recs}) == flows
    assert re.search(r"exported over OTLP to http://localhost:\d+ \(\d+ connections", out), out[-800:]

    assert {lab for lab in list_labs() if lab.startswith(tag)} == before
    assert (set(os.listdir(NETNS_ETC)) if NETNS_ETC.exists() else set()) == etc_before
