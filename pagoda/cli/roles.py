"""`pagoda frontend|tokenizer|scheduler|worker|draft-worker`: one member process each.

`pagoda serve` starts each as `python -m pagoda <role>`; under docker compose or Kubernetes
they start alone. Each role imports its service only when it runs, so no process pays for
another's imports (torch, for one, only in the worker).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile

import msgspec

from pagoda.cli.types import Subcommand
from protocol import EngineConfig
from protocol.config import add_engine_args, config_from_args
from protocol.curve import TransportSecurityError, check_transport


def _setup_logging(config: EngineConfig, name: str) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{name}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds through `finally` blocks; SIGINT is left to the supervisor."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    if os.environ.get("PAGODA_SUPERVISED"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class RoleCommand(Subcommand):
    """A member process: the engine flags, then `run` with the configuration."""

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help=f"start one {self.name} process")
        add_engine_args(parser)
        return parser

    def cmd(self, args: argparse.Namespace) -> int:
        config = config_from_args(args)
        if not config.run_dir:  # started by hand: the members must agree on the sockets' folder
            config = msgspec.structs.replace(config, run_dir=os.path.join(tempfile.gettempdir(), "pagoda"))
        config = config.with_addresses()
        try:  # tcp:// without its keys: one line naming the flags, before anything loads
            check_transport(config, self.name)
        except TransportSecurityError as e:
            raise SystemExit(f"pagoda {self.name}: {e}") from None
        try:
            self.run(config, args)
        except KeyboardInterrupt:
            pass
        return 0

    def run(self, config: EngineConfig, args: argparse.Namespace) -> None:
        raise NotImplementedError


class FrontendCommand(RoleCommand):
    name = "frontend"

    def run(self, config: EngineConfig, args: argparse.Namespace) -> None:
        # No _exit_on_sigterm: uvicorn installs its own handlers and shuts the server down cleanly.
        _setup_logging(config, "frontend")
        from frontend.api_server import run_frontend

        run_frontend(config)


class TokenizerCommand(RoleCommand):
    name = "tokenizer"

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = super().subparser_init(subparsers)
        parser.add_argument("--member-id", default="tokenizer-0", help="this pool member's id")
        return parser

    def run(self, config: EngineConfig, args: argparse.Namespace) -> None:
        _exit_on_sigterm()
        _setup_logging(config, args.member_id)
        from tokenizer_svc.service import run_tokenizer

        run_tokenizer(config, args.member_id)


class SchedulerCommand(RoleCommand):
    name = "scheduler"

    def run(self, config: EngineConfig, args: argparse.Namespace) -> None:
        _exit_on_sigterm()
        _setup_logging(config, "scheduler")
        from scheduler_svc.service import run_scheduler

        run_scheduler(config)


class WorkerCommand(RoleCommand):
    name = "worker"

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = super().subparser_init(subparsers)
        parser.add_argument("--rank", type=int, default=0, help="this worker's tensor-parallel rank")
        parser.add_argument("--group", type=int, default=0,
                            help="this worker's group: the model replica it serves a rank of (data parallel)")
        return parser

    def run(self, config: EngineConfig, args: argparse.Namespace) -> None:
        _exit_on_sigterm()
        from protocol.messages import worker_id

        _setup_logging(config, worker_id(args.group, args.rank))
        from gpu_worker.service import run_worker

        run_worker(config, args.rank, args.group)


class DraftWorkerCommand(RoleCommand):
    name = "draft-worker"

    def subparser_init(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = super().subparser_init(subparsers)
        parser.add_argument("--group", type=int, default=0, help="the worker group it proposes drafts for")
        return parser

    def run(self, config: EngineConfig, args: argparse.Namespace) -> None:
        _exit_on_sigterm()
        from protocol.messages import draft_worker_id

        _setup_logging(config, draft_worker_id(args.group))
        from gpu_worker.draft_service import run_draft_worker

        run_draft_worker(config, args.group)


def cmd_init() -> list[Subcommand]:
    return [FrontendCommand(), TokenizerCommand(), SchedulerCommand(), WorkerCommand(), DraftWorkerCommand()]
