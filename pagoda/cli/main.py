"""`pagoda`: the top parser, built from every subcommand module's `cmd_init()`."""

from __future__ import annotations

import argparse
import sys

from pagoda.cli import bench, keys, roles, serve

CMD_MODULES = (serve, roles, bench, keys)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="Pagoda LLM inference server")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in CMD_MODULES:
        for command in module.cmd_init():
            command.subparser_init(subparsers).set_defaults(dispatch=command.cmd)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.dispatch(args))


if __name__ == "__main__":
    main()
