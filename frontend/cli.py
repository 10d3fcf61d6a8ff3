"""The `pagoda` command: `serve` starts every process; each role can also start alone.

Every `EngineConfig` field is a flag (`max_num_seqs` -> `--max-num-seqs`, as vLLM names them)
and a `PAGODA_*` environment variable (`PAGODA_MAX_NUM_SEQS`); a flag wins over the variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import types
import typing

import msgspec

from protocol import EngineConfig, decode_config

ROLES = ("frontend", "tokenizer", "scheduler", "worker")


def _field_type(annotation: typing.Any) -> type:
    """The scalar type behind `int | None` and the like."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(EngineConfig)
    for f in msgspec.structs.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        env = os.environ.get("PAGODA_" + f.name.upper())
        typ = _field_type(hints[f.name])
        if typ is bool:
            default = f.default if env is None else env.lower() in ("1", "true", "yes", "on")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            default = f.default if env is None else typ(env)
            parser.add_argument(flag, type=typ, default=default, metavar=f.name.upper())
    parser.add_argument("--config-json", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The configuration: whole from --config-json or $PAGODA_ENGINE_CONFIG (how the supervisor
    hands it to its children), else from the flags and PAGODA_* variables."""
    if args.config_json:
        return decode_config(args.config_json)
    if os.environ.get("PAGODA_SUPERVISED") and os.environ.get("PAGODA_ENGINE_CONFIG"):
        return decode_config(os.environ["PAGODA_ENGINE_CONFIG"])
    values = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(EngineConfig)}
    try:
        return EngineConfig(**values)
    except (TypeError, msgspec.ValidationError) as e:
        raise SystemExit(f"pagoda: invalid configuration: {e}") from None


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


def run_role(role: str, config: EngineConfig, member_id: str | None, rank: int) -> None:
    if not config.run_dir:
        config = msgspec.structs.replace(config, run_dir=os.path.join(tempfile.gettempdir(), "pagoda"))
    config = config.with_addresses()
    if role == "frontend":
        _setup_logging(config, "frontend")
        from frontend.api_server import run_frontend

        run_frontend(config)
        return
    _exit_on_sigterm()
    if role == "tokenizer":
        name = member_id or "tokenizer-0"
        _setup_logging(config, name)
        from tokenizer_svc.service import run_tokenizer

        run_tokenizer(config, name)
    elif role == "scheduler":
        _setup_logging(config, "scheduler")
        from scheduler_svc.service import run_scheduler

        run_scheduler(config)
    elif role == "worker":
        _setup_logging(config, f"worker-{rank}")
        from gpu_worker.service import run_worker

        run_worker(config, rank)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagoda", description="Pagoda LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start every process and serve the OpenAI API")
    add_engine_args(serve)
    for role in ROLES:
        p = sub.add_parser(role, help=f"start one {role} process")
        add_engine_args(p)
        if role == "tokenizer":
            p.add_argument("--member-id", default=None, help="this pool member's id (default tokenizer-0)")
        if role == "worker":
            p.add_argument("--rank", type=int, default=0)
    from bench.cli import add_bench_parser

    add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from bench.cli import run_bench

        sys.exit(run_bench(args))
    config = config_from_args(args)

    if args.command == "serve":
        from frontend.supervisor import serve

        sys.exit(serve(config))
    try:
        run_role(args.command, config, getattr(args, "member_id", None), getattr(args, "rank", 0))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
