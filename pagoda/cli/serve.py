"""`pagoda serve`: every process of the engine, and the OpenAI API in front of them."""

from __future__ import annotations

import argparse

from pagoda.cli.types import Subcommand
from protocol.config import add_engine_args, config_from_args


class ServeCommand(Subcommand):
    name = "serve"

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help="start every process and serve the OpenAI API")
        add_engine_args(parser)
        return parser

    def cmd(self, args: argparse.Namespace) -> int:
        from pagoda.supervisor import serve

        return serve(config_from_args(args))


def cmd_init() -> list[Subcommand]:
    return [ServeCommand()]
