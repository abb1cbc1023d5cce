"""OTLP/HTTP compression as configured: gzip at export.otlp.compression_level (default 1), or none.
The bytes on the wire are captured by a loopback HTTP receiver and compared with zlib's own deflate
stream at the expected level, byte for byte (and the gzip header's XFL flag Python writes for the
fastest/best levels), then decompressed to the exact request. (The e2e tier sends the same way to a
real collector: tests/e2e/test_otlp_export.py, tests/e2e/test_flow_log_health.py.)"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from otelflow.config import ConfigError, OtlpConfig, load_config
from otelflow.otlp.exporter import Item, OtlpExporter

BODY = b"".join(b"otelflow.flow.bytes.c2s=%d;" % (i * 7919 % 100_003) for i in range(20_000))


@pytest.fixture()
def wire() -> Iterator[tuple[list[tuple[dict[str, str], bytes]], str]]:
    got: list[tuple[dict[str, str], bytes]] = []

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_POST(self) -> None:
            got.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield got, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def send(url: str, **cfg: object) -> None:
    ex = OtlpExporter(OtlpConfig(endpoint=url, protocol="http/protobuf", **cfg))  # type: ignore[arg-type]
    ex.submit([Item("logs", BODY, 3)])
    assert ex.flush(20)
    ex.close()
    assert ex.stats.sent_items == 3 and ex.stats.failed_requests == 0


def deflate(level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(BODY) + c.flush()


@pytest.mark.parametrize(("level", "xfl"), [(None, 4), (1, 4), (6, 0), (9, 2)])
def test_http_body_is_gzip_at_the_configured_level(
    wire: tuple[list[tuple[dict[str, str], bytes]], str], level: int | None, xfl: int
) -> None:
    got, url = wire
    send(url, **({} if level is None else {"compression_level": level}))  # None: the default
    [(headers, body)] = got
    assert headers["Content-Encoding"] == "gzip" and headers["Content-Type"] == "application/x-protobuf"
    assert body[:3] == b"\x1f\x8b\x08" and body[8] == xfl  # gzip, deflate; XFL: 4 fastest, 2 best
    assert body[10:-8] == deflate(level or 1)  # the deflate stream of exactly that level
    assert gzip.decompress(body) == BODY


def test_levels_trade_cpu_for_bytes_and_none_sends_the_request_as_is(
    wire: tuple[list[tuple[dict[str, str], bytes]], str],
) -> None:
    got, url = wire
    send(url, compression="none")
    send(url, compression_level=1)
    send(url, compression_level=9)
    (h0, raw), (_, fast), (_, best) = got
    assert "Content-Encoding" not in h0 and raw == BODY
    assert len(BODY) > len(fast) > len(best)  # this input: level 9 is smaller than level 1


def test_compression_level_is_checked() -> None:
    assert load_config(None, {}).export.otlp.compression_level == 1
    env = {"OTELFLOW_EXPORT__OTLP__COMPRESSION_LEVEL": "9"}
    assert load_config(None, env).export.otlp.compression_level == 9
    for bad, why in (("0", "must be between 1 and 9, got 0"), ("10", "between 1 and 9, got 10")):
        with pytest.raises(ConfigError, match=why):
            load_config(None, {"OTELFLOW_EXPORT__OTLP__COMPRESSION_LEVEL": bad})
