"""The shape of a subcommand, as in vLLM's `vllm/entrypoints/cli/types.py`."""

from __future__ import annotations

import argparse


class Subcommand:
    """One `pagoda <name>`: it adds its own parser and runs from the parsed arguments."""

    name: str

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        raise NotImplementedError

    def cmd(self, args: argparse.Namespace) -> int:
        """Run the subcommand; the process's exit status."""
        raise NotImplementedError
