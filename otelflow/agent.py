"""The agent's wiring: the whole path of a flow, in one place.

    source  ->  resolve ends + count-once + decorate  ->  aggregate  ->  export
    (conntrack | eBPF)   (IP index: Kubernetes / inventory)  (per interval)  (OTLP, Prometheus, JSON lines)

Each stage is an object with one job, made from the configuration here and nowhere else: the source
yields FlowDeltas, the Decorator names both ends through the IP index and asks CountOnce which
directions this node reports, and the sinks receive DecoratedFlows. Aggregation and OTLP export slot
in as further sinks; today `otelflow run --output json` prints each decorated delta as a JSON line.
"""

from __future__ import annotations

import json
import logging
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Protocol

from otelflow.config import Config
from otelflow.countonce import CountOnce
from otelflow.decorate import DecoratedFlow, Decorator
from otelflow.flow import FlowDelta
from otelflow.meta.index import IpIndex
from otelflow.meta.inventory import InventoryError, build_index, load_inventory_file

log = logging.getLogger("otelflow")


class Source(Protocol):
    name: str

    def start(self) -> None: ...
    def fileno(self) -> int | None: ...
    def on_readable(self) -> None: ...
    def poll(self) -> list[FlowDelta]: ...
    def close(self) -> None: ...


class Sink(Protocol):
    def write(self, deltas: Sequence[DecoratedFlow]) -> None: ...
    def close(self) -> None: ...


class JsonLinesSink:
    """One JSON object per decorated flow delta, one line each, flushed per poll."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, deltas: Sequence[DecoratedFlow]) -> None:
        for d in deltas:
            self.out.write(json.dumps(d.to_json(), separators=(",", ":")) + "\n")
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


class SourceSelectionError(RuntimeError):
    """The requested source cannot run on this node; the message says why."""


def select_source(cfg: Config, requested: str) -> tuple[Source, str]:
    """Pick the flow source: returns it and the reason, logged and reported by `check`."""
    from otelflow.conntrack.source import ConntrackSource

    if requested == "ebpf":
        raise SourceSelectionError(
            "the eBPF source is not available in this build yet (use --source conntrack)"
        )
    reason = (
        "conntrack requested"
        if requested == "conntrack"
        else "auto: eBPF source not built yet, using conntrack"
    )
    return ConntrackSource(cfg.source.conntrack, cfg.node_name or _hostname()), reason


def make_index(cfg: Config) -> IpIndex:
    """The IP index, filled from the static inventory when one is configured."""
    index = IpIndex(history=cfg.metadata.history)
    if cfg.metadata.inventory:
        records, groups = load_inventory_file(cfg.metadata.inventory)
        build_index(records, groups, index)
        log.info("inventory %s: %d records", cfg.metadata.inventory, len(records))
    return index


def _hostname() -> str:
    import socket

    return socket.gethostname()


class Pipeline:
    """Runs a source on its poll interval and hands every batch of deltas to the sinks."""

    def __init__(
        self, source: Source, decorator: Decorator, sinks: Sequence[Sink], poll_interval: float
    ) -> None:
        self.source = source
        self.decorator = decorator
        self.sinks = list(sinks)
        self.poll_interval = poll_interval
        self.stop = threading.Event()
        self.ready = threading.Event()  # set once the source has started (what /readyz reports)

    def run(self, on_tick: Callable[[], None] | None = None) -> None:
        src = self.source
        src.start()
        self.ready.set()
        log.info("ready: %s source started, baseline taken", src.name)
        sel = selectors.DefaultSelector()
        fd = src.fileno()
        if fd is not None:
            sel.register(fd, selectors.EVENT_READ)
        next_poll = time.monotonic() + self.poll_interval
        try:
            while not self.stop.is_set():
                wait = max(0.0, next_poll - time.monotonic())
                if fd is not None:
                    if sel.select(min(wait, 0.5)):
                        src.on_readable()
                else:
                    self.stop.wait(min(wait, 0.5))
                if time.monotonic() >= next_poll:
                    self._emit(src.poll())
                    next_poll += self.poll_interval
                    if next_poll < time.monotonic():  # fell behind: do not burst
                        next_poll = time.monotonic() + self.poll_interval
                    if on_tick:
                        on_tick()
            self._emit(src.poll())  # final flush: nothing seen before the stop is lost
        finally:
            sel.close()
            src.close()
            for s in self.sinks:
                s.close()

    def _emit(self, deltas: list[FlowDelta]) -> None:
        if deltas:
            decorated = [self.decorator.decorate(d) for d in deltas]
            for s in self.sinks:
                s.write(decorated)


def run_agent(cfg: Config, source_name: str, output: str) -> int:
    """`otelflow run`: build the pipeline from the configuration and run it until SIGTERM/SIGINT."""
    from otelflow.conntrack.source import ConntrackUnavailable

    logging.basicConfig(
        level=cfg.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        source, reason = select_source(cfg, source_name)
    except SourceSelectionError as e:
        print(f"otelflow run: {e}", file=sys.stderr)
        return 1
    log.info("flow source: %s (%s)", source.name, reason)
    node = cfg.node_name or _hostname()
    try:
        index = make_index(cfg)
    except InventoryError as e:
        print(f"otelflow run: inventory: {e}", file=sys.stderr)
        return 2
    sinks: list[Sink] = [JsonLinesSink(sys.stdout)] if output == "json" else []
    pipe = Pipeline(source, Decorator(index, CountOnce(node)), sinks, cfg.source.poll_interval)

    def stop(signum: int, frame: object) -> None:
        pipe.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        pipe.run()
    except ConntrackUnavailable as e:
        print(f"otelflow run: {e}", file=sys.stderr)
        return 1
    return 0
