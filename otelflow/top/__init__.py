"""`otelflow top`: a live terminal view of the cluster's network, read from the agents' JSON API.

sources.py reads agents (a URL, a network namespace, or pods through the API server's pod proxy);
model.py merges their answers (count-once makes it a sum); view.py lays out panes, sorting,
filtering and help as text; tui.py is the curses loop.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable

from otelflow.top.model import Model, merge
from otelflow.top.sources import FETCH_TIMEOUT, Agent, Fetcher, HttpAgent, PodDiscovery
from otelflow.top.view import PANES, SORTS, Filter, FilterError, State, text_frame

DEFAULT_NAMESPACE = "otelflow"
DEFAULT_SELECTOR = "app.kubernetes.io/name=otelflow,app.kubernetes.io/component=agent"
DEFAULT_PORT = 9465


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--agent",
        metavar="URL",
        action="append",
        default=[],
        help="an agent's API (http://HOST:PORT), repeatable (default: api.listen of the configuration)",
    )
    sp.add_argument(
        "-c", "--config", metavar="FILE", help="configuration whose api.listen is the default agent"
    )
    sp.add_argument(
        "--kubeconfig", metavar="FILE", help="read every agent pod through this API server's pod proxy"
    )
    sp.add_argument(
        "--in-cluster", action="store_true", help="like --kubeconfig, with this pod's ServiceAccount"
    )
    sp.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help=f"agent pods' namespace (default {DEFAULT_NAMESPACE})"
    )
    sp.add_argument(
        "--selector", default=DEFAULT_SELECTOR, help=f"agent pods' labels (default {DEFAULT_SELECTOR})"
    )
    sp.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"agent pods' api port (default {DEFAULT_PORT})"
    )
    sp.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    sp.add_argument(
        "--pane", choices=PANES, default="workloads", help="pane to start with (default workloads)"
    )
    sp.add_argument("--sort", choices=SORTS, default="bytes", help="sort key (default bytes)")
    sp.add_argument(
        "--filter", default="", metavar="TERMS", help="initial filter, as typed after '/' (see h)"
    )
    sp.add_argument(
        "--limit", type=int, default=500, help="connection rows asked from each agent (default 500)"
    )
    sp.add_argument(
        "--once", action="store_true", help="print one frame as text and exit (no terminal needed)"
    )


def _default_agent(config: str | None) -> str:
    import os

    from otelflow.config import load_config

    cfg = load_config(config or os.environ.get("OTELFLOW_CONFIG") or None)
    if not cfg.api.listen:
        raise ValueError("api.listen is empty in the configuration: give --agent URL")
    host, _, port = cfg.api.listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_fetcher(args: argparse.Namespace) -> Fetcher:
    """The agents to read, from the options; ValueError or KubeConfigError (one line) when wrong."""
    from otelflow.k8s.client import KubeClient, in_cluster_config, kubeconfig_config

    agents: list[Agent] = [HttpAgent(u) for u in args.agent]
    discovery = None
    if args.kubeconfig or args.in_cluster:
        cfg = kubeconfig_config(args.kubeconfig) if args.kubeconfig else in_cluster_config()
        client = KubeClient(cfg, connect_timeout=FETCH_TIMEOUT, read_timeout=FETCH_TIMEOUT)
        discovery = PodDiscovery(client, args.namespace, args.selector, args.port)
    elif not agents:
        agents = [HttpAgent(_default_agent(args.config))]
    # live: a refresh never waits longer than its interval for a slow agent; --once: the full timeout
    return Fetcher(agents, discovery, FETCH_TIMEOUT + 1.0 if args.once else args.interval)


def loader(fetcher: Fetcher, limit: int) -> Callable[[], Model]:
    def load() -> Model:
        results, problem = fetcher.fetch(limit)
        return merge(results, problem)

    return load


def show(load: Callable[[], Model], state: State, interval: float) -> None:
    """Run the curses view until the user quits."""
    import curses

    from otelflow.top.tui import Poller, run

    poller = Poller(load, interval)
    try:
        curses.wrapper(run, poller, state)
    finally:
        poller.close()


def main(args: argparse.Namespace) -> int:
    from otelflow.config import ConfigError
    from otelflow.k8s.client import KubeConfigError

    if args.interval <= 0 or args.limit < 0 or not 0 < args.port < 65536:
        print("otelflow top: --interval must be > 0, --limit >= 0, --port 1..65535", file=sys.stderr)
        return 2
    try:
        state = State(pane=args.pane, sort=args.sort, filter=Filter.parse(args.filter), once=args.once)
        fetcher = make_fetcher(args)
    except (ValueError, ConfigError, KubeConfigError, FilterError) as e:
        print(f"otelflow top: {e}", file=sys.stderr)
        return 2
    try:
        load = loader(fetcher, args.limit)
        if args.once:
            model = load()
            rows = max(len(model.nodes), len(model.pairs), len(model.connections))
            width = max(shutil.get_terminal_size((200, 50)).columns, 160)
            print(text_frame(model, state, width, rows + 6))
            for a in model.agents:
                if not a.ok:
                    print(f"otelflow top: {a.error}", file=sys.stderr)
            if model.problem:
                print(f"otelflow top: {model.problem}", file=sys.stderr)
            return 0 if any(a.ok for a in model.agents) else 1
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            print("otelflow top: needs a terminal (use --once to print one frame)", file=sys.stderr)
            return 2
        show(load, state, args.interval)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        fetcher.close()
