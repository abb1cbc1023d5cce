"""Command-line entry point: `otelflow <command>`.

Each subcommand lives in its own module; this file only parses arguments and dispatches.
Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from otelflow import __version__


def _not_yet(name: str, issue: str) -> int:
    print(f"otelflow {name}: not available yet ({issue})", file=sys.stderr)
    return 1


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"otelflow {__version__}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from otelflow.check import main as check_main
    from otelflow.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"otelflow: {e}", file=sys.stderr)
        return 2
    return check_main(cfg, args.json)


def _cmd_run(args: argparse.Namespace) -> int:
    from otelflow.agent import run_agent
    from otelflow.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"otelflow: {e}", file=sys.stderr)
        return 2
    return run_agent(cfg, args.source or cfg.source.mode, args.output)


def _cmd_demo(args: argparse.Namespace) -> int:
    from otelflow.demo import main as demo_main

    return demo_main(args)


def _cmd_netlab(args: argparse.Namespace) -> int:
    from otelflow.netlab.cli import main as netlab_main

    return netlab_main(args)


def _cmd_top(args: argparse.Namespace) -> int:
    from otelflow.top import main as top_main

    return top_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otelflow", description="OpenTelemetry-native network-flow agent")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sp = sub.add_parser("version", help="print the version")
    sp.set_defaults(func=_cmd_version)

    for name, func, help_ in (
        ("check", _cmd_check, "preflight report: kernel, capabilities, conntrack, API server, collector"),
        ("run", _cmd_run, "run the agent"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            default=os.environ.get("OTELFLOW_CONFIG") or None,
            help="YAML configuration file (default: $OTELFLOW_CONFIG)",
        )
        sp.set_defaults(func=func)
        if name == "check":
            sp.add_argument("--json", action="store_true", help="print the results as JSON")
        if name == "run":
            sp.add_argument(
                "--source",
                choices=("auto", "ebpf", "conntrack"),
                help="flow source (default: source.mode from the configuration)",
            )
            sp.add_argument(
                "--output",
                choices=("json", "none"),
                default="none",
                help="json: also print every decorated flow delta as a JSON line on stdout (debugging)",
            )

    sp = sub.add_parser("demo", help="build a lab cluster on this machine, run traffic, show the flows")
    sp.add_argument("--duration", type=float, default=20.0, help="seconds of traffic (default 20)")
    sp.add_argument(
        "--keep", action="store_true", help="leave the lab up (remove with 'otelflow netlab down')"
    )
    sp.set_defaults(func=_cmd_demo)

    sp = sub.add_parser("netlab", help="build and remove network-namespace lab clusters")
    from otelflow.netlab.cli import add_arguments

    add_arguments(sp)
    sp.set_defaults(func=_cmd_netlab)

    sp = sub.add_parser("top", help="live view of the cluster's flows (nodes, workloads, connections)")
    from otelflow.top import add_arguments as top_arguments

    top_arguments(sp)
    sp.set_defaults(func=_cmd_top)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
