"""`dispatch-bridge` and its subcommands.

Each subcommand lives in its own module, which offers `add_arguments(parser)`
and `run(args) -> int`. This module only wires them up and maps failures to
exit codes: 0 on a clean stop, 2 for a usage or configuration error, 1 for
anything else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Protocol

from bridge import __version__
from bridge.config import ConfigError

_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("bridge.run_command", "run the bridge: Dispatch API to retained MQTT topics"),
    "api": ("bridge.api.command", "run the local Dispatch API server (gRPC over SQLite)"),
    "demo": ("bridge.demo", "start API server, broker, bridge and sample dispatches"),
    "watch": ("bridge.watch", "live view of the dispatch topics for field engineers"),
    "health": ("bridge.health", "exit 0 if the bridge is online and vouching, 1 otherwise"),
    "audit": ("bridge.audit_command", "read the bridge's audit journal, one line per entry"),
    # One module for the three requests: it tells them apart by the parser's name.
    "resync": ("bridge.request_command", "ask the bridge to list the API again, republish all"),
    "hold": ("bridge.request_command", "hold a dispatch type locally: published as not running"),
    "release": ("bridge.request_command", "end a hold of a dispatch type, or every hold"),
}


class _Subcommand(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(module_name: str) -> _Subcommand | None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise
    return module


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available subcommand.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="dispatch-bridge",
        description="Publish Frequenz dispatches and their schedule as retained MQTT topics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, summary) in _SUBCOMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        sub = subparsers.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: The arguments, without the program name; default `sys.argv`.

    Returns:
        The exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.handler(args)
    except ConfigError as error:
        print(f"dispatch-bridge {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
