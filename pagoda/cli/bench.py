"""`pagoda bench <workload>`: the parser and the runner live in the `bench` package."""

from __future__ import annotations

import argparse

from bench.cli import add_bench_parser, run_bench
from pagoda.cli.types import Subcommand


class BenchCommand(Subcommand):
    name = "bench"

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        return add_bench_parser(subparsers)

    def cmd(self, args: argparse.Namespace) -> int:
        return run_bench(args)


def cmd_init() -> list[Subcommand]:
    return [BenchCommand()]
