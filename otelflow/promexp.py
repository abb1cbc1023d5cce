"""The agent's own HTTP endpoint: Prometheus `/metrics` (the same series as OTLP, named as the
collector's Prometheus exporter names them), `/healthz` (the process is alive), `/readyz` (the
first poll of the flow source succeeded) and, with a live view, `/api/v1/top` (JSON for `otelflow top`,
see otelflow/live.py)."""

from __future__ import annotations

import json
import math
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from otelflow.aggregate import HistSeries, Series
from otelflow.schema import METRICS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label_name(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)


def escape_label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(
    snapshot: dict[str, list[Series]],
    pairs: Callable[[Series], tuple[tuple[str, str | int], ...]],
) -> str:
    """Prometheus text exposition of an aggregator snapshot (cumulative values). A histogram is
    ``_bucket`` series with cumulative counts per ``le`` (the schema's bounds, then ``+Inf``), ``_sum``
    and ``_count``, as the collector's Prometheus exporter writes an OTLP histogram."""
    defs = {m.name: m for m in METRICS}
    out: list[str] = []
    for name, series in snapshot.items():
        d = defs[name]
        if d.kind == "histogram":
            out += _histogram(d.prometheus, d.brief, d.unit, d.bounds, series, pairs)
            continue
        ptype = "counter" if d.kind == "counter" else "gauge"
        out.append(f"# HELP {d.prometheus} {d.brief} ({d.unit})")
        out.append(f"# TYPE {d.prometheus} {ptype}")
        for s in series:
            labels = ",".join(f'{_label_name(k)}="{escape_label_value(str(v))}"' for k, v in pairs(s))
            out.append(f"{d.prometheus}{{{labels}}} {s.total}" if labels else f"{d.prometheus} {s.total}")
    return "\n".join(out) + "\n"


def le_label(bound: float) -> str:
    """A bucket bound as Prometheus' Go client writes it (strconv 'g' with the shortest digits that
    round-trip: 5e-05, 0.0001, 1, 2.5, 1e+06): exponent form below 1e-4 and from 1e6."""
    if math.isinf(bound):
        return "+Inf" if bound > 0 else "-Inf"
    if bound == 0:
        return "0"
    exp = int(f"{bound:.17e}".partition("e")[2])  # the decimal exponent; the digits come from repr
    digits = repr(abs(bound)).split("e")[0].replace(".", "").lstrip("0").rstrip("0") or "0"
    sign = "-" if bound < 0 else ""
    if exp < -4 or exp >= 6:
        frac = f".{digits[1:]}" if len(digits) > 1 else ""
        return f"{sign}{digits[0]}{frac}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return f"{bound:.{max(len(digits) - 1 - exp, 0)}f}"


def _histogram(
    prom: str,
    brief: str,
    unit: str,
    bounds: tuple[float, ...],
    series: list[Series],
    pairs: Callable[[Series], tuple[tuple[str, str | int], ...]],
) -> list[str]:
    out = [f"# HELP {prom} {brief} ({unit})", f"# TYPE {prom} histogram"]
    les = [*(le_label(b) for b in bounds), "+Inf"]
    for s in series:
        h = cast(HistSeries, s)
        labels = "".join(f'{_label_name(k)}="{escape_label_value(str(v))}",' for k, v in pairs(h))
        cum = 0
        for le, n in zip(les, h.counts, strict=True):
            cum += n
            out.append(f'{prom}_bucket{{{labels}le="{le}"}} {cum}')
        plain = f"{{{labels[:-1]}}}" if labels else ""
        out.append(f"{prom}_sum{plain} {h.sum_us / 1e6!r}")
        out.append(f"{prom}_count{plain} {h.total}")
    return out


class AgentHttpServer:
    """Serves /metrics, /healthz, /readyz (and /api/v1/top with a live view) on host:port in a
    background thread."""

    def __init__(
        self,
        listen: str,
        metrics: Callable[[], str],
        ready: Callable[[], bool],
        top: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics(), CONTENT_TYPE)
                elif path == "/healthz":
                    self._send(200, "ok\n")
                elif path == "/readyz":
                    ok = outer.ready()
                    self._send(200 if ok else 503, "ready\n" if ok else "not ready\n")
                elif path == "/api/v1/top" and outer.top is not None:
                    query = urllib.parse.parse_qs(self.path.partition("?")[2])
                    raw = query.get("limit", ["500"])[-1]
                    if not raw.isdigit():
                        self._send(400, f"limit: want a non-negative integer, got {raw!r}\n")
                        return
                    body = json.dumps(outer.top(int(raw)), separators=(",", ":"))
                    self._send(200, body, "application/json")
                else:
                    self._send(404, "not found\n")

        self.metrics = metrics
        self.ready = ready
        self.top = top
        family = ThreadingHTTPServer
        if ":" in host:
            import socket

            class V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            family = V6
        self.server = family((host, int(port)), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="agent-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
