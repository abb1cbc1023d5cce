"""Run real `otelflow run` agent processes inside netlab node namespaces and collect their output
(the tests' harness and the demo's engine: the agent runs exactly as on a node, one per node)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from otelflow.netlab.lab import Lab
from otelflow.netlab.traffic import FlowResult


@dataclass
class AgentRun:
    node: str
    proc: subprocess.Popen[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    _reader: threading.Thread | None = None
    _err_reader: threading.Thread | None = None
    _err_lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    _taken: int = 0

    def take_new(self) -> list[dict[str, Any]]:
        """Records that arrived since the last call (for live views)."""
        n = len(self.records)
        new = self.records[self._taken : n]
        self._taken = n
        return new

    def flows_of(self, r: FlowResult) -> list[dict[str, Any]]:
        """This agent's records of one generator flow (by its unique client port and transport)."""
        return [
            x for x in self.records if x["client_port"] == r.client_port and x["transport"] == r.spec.proto
        ]


def counted(recs: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    """Like totals, but only the directions each record's node owns (count-once)."""
    return (
        sum(x["bytes_c2s"] or 0 for x in recs if x["count_c2s"]),
        sum(x["packets_c2s"] or 0 for x in recs if x["count_c2s"]),
        sum(x["bytes_s2c"] or 0 for x in recs if x["count_s2c"]),
        sum(x["packets_s2c"] or 0 for x in recs if x["count_s2c"]),
    )


def totals(recs: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    """(bytes c2s, packets c2s, bytes s2c, packets s2c) summed over records."""
    return (
        sum(x["bytes_c2s"] or 0 for x in recs),
        sum(x["packets_c2s"] or 0 for x in recs),
        sum(x["bytes_s2c"] or 0 for x in recs),
        sum(x["packets_s2c"] or 0 for x in recs),
    )


def endpoint_nodes(lab: Lab, r: FlowResult) -> list[str]:
    """The nodes a generator flow's client and answering server run on (external hosts have none)."""
    return sorted({n for n in (lab.endpoint(r.spec.client).node, lab.endpoint(r.server_endpoint).node) if n})


def truth(r: FlowResult) -> tuple[int, int, int, int]:
    return (r.up_l3_bytes, r.up_l3_packets, r.down_l3_bytes, r.down_l3_packets)


@contextlib.contextmanager
def agents(
    lab: Lab,
    nodes: list[str],
    *,
    poll: float = 0.5,
    extra_env: dict[str, str] | None = None,
    warmup: float = 0.2,
    inventory: str | None = None,
    node_env: dict[str, dict[str, str]] | None = None,
    source: str = "conntrack",
) -> Iterator[dict[str, AgentRun]]:
    """Start one agent per node; on exit stop them (SIGTERM: final flush) and parse their JSON lines."""
    runs: dict[str, AgentRun] = {}
    try:
        for node in nodes:
            env = {
                **os.environ,
                "OTELFLOW_NODE_NAME": node,
                "OTELFLOW_SOURCE__POLL_INTERVAL": str(poll),
                "OTELFLOW_LOG_LEVEL": "info",
                "OTELFLOW_METADATA__KUBERNETES__ENABLED": "false",  # lab agents are named by the inventory
                **({"OTELFLOW_METADATA__INVENTORY": inventory} if inventory else {}),
                **(extra_env or {}),
                **((node_env or {}).get(node, {})),
            }
            cmd = ["ip", "netns", "exec", lab.node_netns(node), sys.executable, "-m", "otelflow", "run"]
            p = subprocess.Popen(
                [*cmd, "--source", source, "--output", "json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            run = AgentRun(node, p)

            def read(run: AgentRun = run) -> None:
                assert run.proc.stdout is not None
                for line in run.proc.stdout:
                    run.records.append(json.loads(line))

            def read_err(run: AgentRun = run) -> None:
                assert run.proc.stderr is not None
                for line in run.proc.stderr:
                    run._err_lines.append(line)
                    if " ready: " in line:
                        run.ready.set()

            run._reader = threading.Thread(target=read, daemon=True)
            run._reader.start()
            run._err_reader = threading.Thread(target=read_err, daemon=True)
            run._err_reader.start()
            runs[node] = run
        # traffic must start after every agent's baseline dump: wait for each to say it is ready
        deadline = time.monotonic() + 60
        for run in runs.values():
            while not run.ready.wait(0.1):
                if run.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"agent on {run.node} did not become ready: {''.join(run._err_lines)[-2000:]}"
                    )
        time.sleep(warmup)
        yield runs
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
        for run in runs.values():
            try:
                run.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
            for t in (run._reader, run._err_reader):
                if t:
                    t.join(timeout=10)
            run.stderr = "".join(run._err_lines)
