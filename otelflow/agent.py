"""The agent's wiring: the whole path of a flow, in one place.

    source  ->  resolve ends + count-once + decorate  ->  aggregate  ->  export
    (conntrack | eBPF)   (IP index: Kubernetes / inventory)  (per interval)  (OTLP, Prometheus, JSON lines)

Each stage is an object with one job, made from the configuration here and nowhere else: the source
yields FlowDeltas each poll; the Decorator names both ends through the IP index (fed by the
Kubernetes cache and/or the inventory) and asks CountOnce which directions this node reports; the
ExportStage aggregates into metric series, exports them over OTLP every export interval and flow logs
as they come, and serves them on /metrics; `--output json` adds a sink that prints each decorated
delta as a JSON line.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import selectors
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

from otelflow.aggregate import Aggregator
from otelflow.config import Config
from otelflow.countonce import CountOnce
from otelflow.decorate import DecoratedFlow, Decorator
from otelflow.export import ExportStage
from otelflow.flow import FlowDelta
from otelflow.k8s.cache import MetadataCache, client_from_config
from otelflow.k8s.client import KubeConfigError
from otelflow.live import LiveView
from otelflow.meta.index import IpIndex
from otelflow.meta.inventory import InventoryError, build_index, load_inventory_file
from otelflow.otlp.exporter import OtlpExporter
from otelflow.otlp.logs import LogFilter, LogsEncoder
from otelflow.otlp.metrics import MetricsEncoder
from otelflow.promexp import AgentHttpServer
from otelflow.selfmetrics import SdkSelfTelemetry, SelfMetrics

log = logging.getLogger("otelflow")


class Source(Protocol):
    name: str

    def start(self) -> None: ...
    def fileno(self) -> int | None: ...
    def on_readable(self) -> None: ...
    def poll(self, final: bool = False) -> list[FlowDelta]: ...  # final: the agent is stopping
    def close(self) -> None: ...


class Sink(Protocol):
    def write(self, deltas: Sequence[DecoratedFlow]) -> None: ...
    def tick(self) -> None: ...  # after every poll (export intervals are the sink's business)
    def close(self) -> None: ...


class JsonLinesSink:
    """One JSON object per decorated flow delta, one line each, flushed per poll."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, deltas: Sequence[DecoratedFlow]) -> None:
        for d in deltas:
            self.out.write(json.dumps(d.to_json(), separators=(",", ":")) + "\n")
        self.out.flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        self.out.flush()


class SourceSelectionError(RuntimeError):
    """The requested source cannot run on this node; the message says why."""


# why a source was chosen, as a label value (the full reason is logged and shown by `check`)
REASON_CODES = {
    "kernel BTF": "no_btf",
    "bpf() permitted": "bpf_denied",
    "tc attach": "tc_attach_failed",
    "tcx attach": "tcx_attach_failed",
}


def select_source(cfg: Config, requested: str, node: str) -> tuple[Source, str, str]:
    """Pick the flow source: returns it, the reason (logged and reported by `check`) and a short
    reason code (the self-metric otelflow_agent_source's label).

    auto: eBPF when the kernel has BTF, bpf() is permitted and a test TC attach works
    (otelflow.ebpf.features, the same probes `otelflow check` runs), else conntrack."""
    from otelflow.conntrack.source import ConntrackSource
    from otelflow.ebpf.features import SourceUnavailable, choose_source, ebpf_readiness

    readiness = ebpf_readiness(attach=cfg.source.ebpf.attach) if requested != "conntrack" else None
    try:
        mode, reason = choose_source(requested, readiness=readiness)
    except SourceUnavailable as e:
        raise SourceSelectionError(f"{e} (use --source auto or conntrack)") from None
    if requested == "conntrack":
        code = "requested"
    elif readiness is not None and not readiness[0]:
        why = readiness[1]  # "<probe name>: <detail>" of the probe that decided
        failed = next((p.name for p in readiness[2] if not p.ok and why.startswith(f"{p.name}:")), "")
        code = REASON_CODES.get(failed, "ebpf_unavailable")
    else:
        code = "ebpf_ready"
    if mode == "ebpf":
        from otelflow.ebpf.source import EbpfSource

        return EbpfSource(cfg.source, node), reason, code
    return ConntrackSource(cfg.source.conntrack, node), reason, code


def make_index(cfg: Config) -> tuple[IpIndex, MetadataCache | None]:
    """The IP index, filled from the static inventory when one is configured, and the Kubernetes
    list+watch cache that keeps it current when metadata.kubernetes is on: started here, stopped by
    the caller. While the cache runs, every reader of the index holds ``cache.lock``."""
    index = IpIndex(history=cfg.metadata.history)
    if cfg.metadata.inventory:
        records, groups = load_inventory_file(cfg.metadata.inventory)
        build_index(records, groups, index)
        log.info("inventory %s: %d records", cfg.metadata.inventory, len(records))
    kube = cfg.metadata.kubernetes
    client = client_from_config(kube.enabled, kube.kubeconfig)
    if client is None:
        return index, None
    cache = MetadataCache(client, index, page_size=kube.page_size)
    cache.start()
    log.info("kubernetes metadata from %s (%s)", client.server, client.config.source)
    if cache.wait_synced(30):
        log.info("kubernetes metadata synced")
    else:  # keep going: the cache serves what it has and fills in; the flows' names follow
        log.warning("kubernetes metadata not synced after 30 s (%s): starting anyway", cache.stats())
    return index, cache


def _hostname() -> str:
    import socket

    return socket.gethostname()


class Pipeline:
    """Runs a source on its poll interval and hands every batch of deltas to the sinks."""

    def __init__(
        self,
        source: Source,
        decorator: Decorator,
        sinks: Sequence[Sink],
        poll_interval: float,
        index_lock: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        self.source = source
        self.decorator = decorator
        self.sinks = list(sinks)
        self.poll_interval = poll_interval
        # held while a batch is decorated: the metadata cache's lock, when one feeds the index
        self.index_lock = index_lock or contextlib.nullcontext()
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
                    for sink in self.sinks:
                        sink.tick()
                    if on_tick:
                        on_tick()
            self._emit(src.poll(final=True))  # final flush: nothing seen before the stop is lost
        finally:
            sel.close()
            src.close()
            for s in self.sinks:
                s.close()

    def _emit(self, deltas: list[FlowDelta]) -> None:
        if deltas:
            with self.index_lock:
                decorated = [self.decorator.decorate(d) for d in deltas]
            for s in self.sinks:
                s.write(decorated)


def run_agent(cfg: Config, source_name: str, output: str) -> int:
    """`otelflow run`: build the pipeline from the configuration and run it until SIGTERM/SIGINT."""
    from otelflow.conntrack.source import ConntrackUnavailable
    from otelflow.ebpf.loader import EbpfError

    logging.basicConfig(
        level=cfg.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    node = cfg.node_name or _hostname()
    try:
        source, reason, code = select_source(cfg, source_name, node)
    except SourceSelectionError as e:
        print(f"otelflow run: {e}", file=sys.stderr)
        return 1
    log.info("flow source: %s (%s)", source.name, reason)
    try:
        index, cache = make_index(cfg)
    except InventoryError as e:
        print(f"otelflow run: inventory: {e}", file=sys.stderr)
        return 2
    except KubeConfigError as e:
        print(f"otelflow run: kubernetes: {e}", file=sys.stderr)
        return 2
    try:
        res = resource_attributes(cfg, node)  # one identity (service.instance.id) for everything it sends
        export = make_export(cfg, res)
    except (OSError, ValueError) as e:
        print(f"otelflow run: export: {e}", file=sys.stderr)
        return 2
    sinks: list[Sink] = [export]
    live = None
    if cfg.api.listen:  # what `otelflow top` reads on /api/v1/top
        live = LiveView(node, cfg.api.top_window, cfg.api.top_max_connections)
        sinks.append(live)
    if output == "json":
        sinks.append(JsonLinesSink(sys.stdout))
    lock = cache.lock if cache else None
    pipe = Pipeline(source, Decorator(index, CountOnce(node)), sinks, cfg.source.poll_interval, lock)
    selfm = SelfMetrics(
        source,
        export,
        lambda: len(index),
        cache.staleness_seconds if cache else None,
        (source_name, code),
        live,
    )
    export.extra = selfm.render
    sdk = None
    if cfg.export.otlp.endpoint:  # the agent's own health over OTLP too, through the OpenTelemetry SDK
        logging.getLogger("opentelemetry").setLevel(logging.ERROR)  # not a warning per retry
        sdk = SdkSelfTelemetry(selfm, res, cfg.export.otlp, cfg.export.interval)
    servers = []
    for listen in dict.fromkeys(a for a in (cfg.api.listen, cfg.export.prometheus.listen) if a):
        try:
            top = live.snapshot if live and listen == cfg.api.listen else None
            servers.append(AgentHttpServer(listen, export.prometheus, pipe.ready.is_set, top))
        except OSError as e:
            print(f"otelflow run: cannot listen on {listen}: {e.strerror or e}", file=sys.stderr)
            return 1
        log.info("serving /metrics, /healthz, /readyz on %s", listen)

    def stop(signum: int, frame: object) -> None:
        pipe.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack
    try:
        pipe.run()
    except (ConntrackUnavailable, EbpfError) as e:
        print(f"otelflow run: {e}", file=sys.stderr)
        return 1
    finally:
        if sdk:
            sdk.close()
        for srv in servers:
            srv.close()
        if cache:
            cache.stop()
    return 0


def resource_attributes(cfg: Config, node: str) -> list[tuple[str, str]]:
    """The agent's resource: who is reporting (merged with export.resource_attributes, which wins)."""
    import socket
    import uuid

    from otelflow import __version__

    attrs = {
        "service.name": cfg.export.service_name,
        "service.version": __version__,
        "service.instance.id": str(uuid.uuid4()),
        "k8s.node.name": node,
        "host.name": socket.gethostname(),
    }
    if cfg.cluster_name:
        attrs["k8s.cluster.name"] = cfg.cluster_name
    attrs.update(cfg.export.resource_attributes)
    return list(attrs.items())


def make_export(cfg: Config, res: list[tuple[str, str]]) -> ExportStage:
    """Aggregation (always: it feeds /metrics) and, with an endpoint, OTLP metrics and flow logs."""
    from otelflow import __version__

    m, lg = cfg.export.metrics, cfg.export.logs
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    aggregator = Aggregator(m.level, split(m.include), split(m.exclude), m.max_series, m.idle_intervals)
    if not cfg.export.otlp.endpoint:
        return ExportStage(aggregator, cfg.export.interval)
    metrics = MetricsEncoder(res, "otelflow", __version__, cfg.export.temporality)
    logs = None
    if lg.enabled:
        flt = LogFilter(
            frozenset(split(lg.namespaces)),
            frozenset(split(lg.classes)),
            lg.min_bytes,
            lg.sample_percent / 100,
        )
        logs = LogsEncoder(res, "otelflow", __version__, flt)
    exporter = OtlpExporter(cfg.export.otlp)
    log.info(
        "OTLP export to %s (%s), every %.0f s",
        cfg.export.otlp.endpoint,
        cfg.export.otlp.protocol,
        cfg.export.interval,
    )
    return ExportStage(aggregator, cfg.export.interval, metrics, logs, exporter)
