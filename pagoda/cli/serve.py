"""`pagoda serve`: every process of the engine, and the OpenAI API in front of them."""

from __future__ import annotations

import argparse
import sys

from pagoda.cli.types import Subcommand
from protocol.config import add_engine_args, config_from_args


class ServeCommand(Subcommand):
    name = "serve"

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help="start every process and serve the OpenAI API")
        add_engine_args(parser)
        return parser

    def cmd(self, args: argparse.Namespace) -> int:
        from frontend.auth import ApiKeyError, read_api_key
        from pagoda.supervisor import serve
        from protocol.curve import ROLES, TransportSecurityError, check_transport

        config = config_from_args(args)
        try:  # said in one line here, rather than by the first process that dies of it
            check_transport(config, *ROLES)
            read_api_key(config)
        except (TransportSecurityError, ApiKeyError) as e:
            print(f"pagoda serve: {e}", file=sys.stderr)
            return 1
        return serve(config)


def cmd_init() -> list[Subcommand]:
    return [ServeCommand()]
