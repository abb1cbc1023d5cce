"""Real collector and Prometheus processes inside a lab namespace (the agents can reach only lab
addresses), started from generated configs, always stopped."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from otelflow.netlab import ns as nsu


def http_get(netns: str, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET from inside a namespace (the socket is created there)."""
    with nsu.entered(netns):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""


def wait_http(netns: str, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, _ = http_get(netns, url, timeout=2)
        if code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """SIGTERM, wait `grace` seconds, then SIGKILL."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Collector:
    """The collector built by scripts/build-collector, with an OTLP receiver, a Prometheus exporter
    and a file exporter for logs, listening on `ip` inside `netns`."""

    def __init__(self, binary: str, netns: str, ip: str, workdir: Path) -> None:
        self.binary, self.netns, self.ip, self.workdir = binary, netns, ip, workdir
        self.logs_file = workdir / "logs.jsonl"
        self.config = workdir / "collector.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        cfg: dict[str, Any] = {
            "extensions": {"health_check": {"endpoint": f"{ip}:13133"}},
            "receivers": {
                "otlp": {
                    "protocols": {"grpc": {"endpoint": f"{ip}:4317"}, "http": {"endpoint": f"{ip}:4318"}}
                }
            },
            "processors": {"batch": {"timeout": "200ms"}},
            "exporters": {
                "prometheus": {"endpoint": f"{ip}:9464"},
                "file": {"path": str(self.logs_file)},
            },
            "service": {
                "extensions": ["health_check"],
                "telemetry": {"metrics": {"level": "none"}},
                "pipelines": {
                    "metrics": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["prometheus"]},
                    "logs": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["file"]},
                },
            },
        }
        self.config.write_text(yaml.safe_dump(cfg))

    def start(self) -> None:
        out = open(self.workdir / "collector.out", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            nsu.ns_cmd(self.netns, [self.binary, "--config", str(self.config)]), stdout=out, stderr=out
        )
        wait_http(self.netns, f"http://{self.ip}:13133/")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log_records(self) -> list[dict[str, Any]]:
        """Every log record the file exporter wrote, with attributes flattened to a dict."""
        out = []
        if not self.logs_file.exists():
            return out
        for line in self.logs_file.read_text().splitlines():
            doc = json.loads(line)
            for rl in doc.get("resourceLogs", []):
                for sl in rl.get("scopeLogs", []):
                    for rec in sl.get("logRecords", []):
                        attrs = {}
                        for kv in rec.get("attributes", []):
                            v = kv["value"]
                            if "intValue" in v:
                                attrs[kv["key"]] = int(v["intValue"])
                            elif "doubleValue" in v:
                                attrs[kv["key"]] = float(v["doubleValue"])
                            else:
                                attrs[kv["key"]] = v.get("stringValue")
                        out.append(attrs)
        return out


class Prometheus:
    """Debian's prometheus scraping the collector every second, inside `netns`."""

    def __init__(self, netns: str, ip: str, target: str, workdir: Path) -> None:
        self.netns, self.ip, self.workdir = netns, ip, workdir
        self.binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "collector", "static_configs": [{"targets": [target]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.workdir / "prometheus.out", "ab")  # noqa: SIM115 - owned by the process
        cmd = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address={self.ip}:9090",
        ]
        self.proc = subprocess.Popen(nsu.ns_cmd(self.netns, cmd), stdout=out, stderr=out)
        wait_http(self.netns, f"http://{self.ip}:9090/-/ready")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def query(self, promql: str) -> float | None:
        """An instant query's single value (None when empty)."""
        url = f"http://{self.ip}:9090/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        code, body = http_get(self.netns, url)
        assert code == 200, body[:300]
        res = json.loads(body)["data"]["result"]
        return float(res[0]["value"][1]) if res else None


@contextlib.contextmanager
def running(*procs: Collector | Prometheus) -> Iterator[None]:
    try:
        for p in procs:
            p.start()
        yield
    finally:
        for p in reversed(procs):
            p.stop()
