"""The `pagoda` command: its subcommands, their own flags, and the engine flags with their
`PAGODA_*` variables. Parsing only: nothing here starts a server (tests/e2e does)."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from pagoda.cli import roles
from pagoda.cli.main import build_parser, main
from protocol.config import EngineConfig, config_from_args, encode_config

SUBCOMMANDS = ("serve", "frontend", "tokenizer", "scheduler", "worker", "bench")
ENGINE_SUBCOMMANDS = ("serve", "frontend", "tokenizer", "scheduler", "worker")
FIELDS = [f.name for f in msgspec.structs.fields(EngineConfig)]


@pytest.fixture(autouse=True)
def no_pagoda_env(monkeypatch):
    """The engine flags read PAGODA_* when the parser is built: start from none set."""
    for name in [*FIELDS, "supervised", "engine_config"]:
        monkeypatch.delenv("PAGODA_" + name.upper(), raising=False)


def parse(*argv: str):
    return build_parser().parse_args(argv)


def test_help_lists_every_subcommand_and_imports_no_service():
    out = subprocess.run([sys.executable, "-m", "pagoda", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert name in out.stdout
    # Building the parser must stay cheap: each role imports its service only when it runs.
    probe = "import sys; from pagoda.cli.main import build_parser; build_parser(); print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    for heavy in ("'torch'", "'transformers'", "'fastapi'", "'gpu_worker.service'", "'tokenizer_svc.service'"):
        assert heavy not in loaded


@pytest.mark.parametrize("command", ENGINE_SUBCOMMANDS)
def test_every_engine_subcommand_takes_every_config_field_as_a_flag(command):
    extra = {"tokenizer": ("--member-id", "t"), "worker": ("--rank", "0")}.get(command, ())
    args = parse(command, *extra)
    own = {"tokenizer": {"member_id"}, "worker": {"rank", "group"}}.get(command, set())
    assert set(vars(args)) == {*FIELDS, *own, "config_json", "command", "dispatch"}
    assert config_from_args(args) == EngineConfig()
    args = parse(command, "--max-num-seqs", "7", "--no-enable-prefix-caching", "--kv-cache-memory-gb", "1.5",
                 "--model", "m", *extra)
    config = config_from_args(args)
    assert (config.max_num_seqs, config.enable_prefix_caching, config.kv_cache_memory_gb, config.model) == (
        7, False, 1.5, "m")


def test_each_role_flag_is_on_its_own_parser_only(capsys):
    assert parse("worker", "--rank", "3").rank == 3
    assert parse("worker").rank == 0 and parse("worker").group == 0
    assert parse("worker", "--group", "2").group == 2
    assert parse("tokenizer", "--member-id", "tokenizer-7").member_id == "tokenizer-7"
    assert parse("tokenizer").member_id == "tokenizer-0"
    for command in ("serve", "frontend", "scheduler", "tokenizer"):
        with pytest.raises(SystemExit) as e:
            parse(command, "--rank", "1")
        assert e.value.code == 2 and "unrecognized arguments: --rank" in capsys.readouterr().err
    for command in ("serve", "frontend", "scheduler", "worker"):
        with pytest.raises(SystemExit):
            parse(command, "--member-id", "x")
        assert "unrecognized arguments: --member-id" in capsys.readouterr().err


def test_pagoda_variables_set_the_defaults_and_a_flag_wins(monkeypatch):
    monkeypatch.setenv("PAGODA_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("PAGODA_GPU_MEMORY_UTILIZATION", "0.5")
    monkeypatch.setenv("PAGODA_ENABLE_PREFIX_CACHING", "0")
    monkeypatch.setenv("PAGODA_API_KEY", "secret")
    config = config_from_args(parse("serve"))
    assert (config.max_num_seqs, config.gpu_memory_utilization, config.enable_prefix_caching, config.api_key) == (
        7, 0.5, False, "secret")
    config = config_from_args(parse("serve", "--max-num-seqs", "9", "--enable-prefix-caching", "--api-key", "k"))
    assert (config.max_num_seqs, config.enable_prefix_caching, config.api_key) == (9, True, "k")


def test_a_supervised_child_takes_the_whole_config_from_its_environment(monkeypatch):
    sent = EngineConfig(model="m", max_num_seqs=5, api_key="k")
    assert config_from_args(parse("scheduler", "--config-json", encode_config(sent))) == sent
    monkeypatch.setenv("PAGODA_ENGINE_CONFIG", encode_config(sent))
    assert config_from_args(parse("scheduler", "--max-num-seqs", "9")).max_num_seqs == 9  # not supervised
    monkeypatch.setenv("PAGODA_SUPERVISED", "1")
    assert config_from_args(parse("scheduler", "--max-num-seqs", "9")) == sent


def test_an_invalid_value_is_a_one_line_error(monkeypatch):
    out = subprocess.run([sys.executable, "-m", "pagoda", "serve", "--max-num-seqs", "many"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "pagoda serve: error: argument --max-num-seqs: invalid int value: 'many'")
    assert "Traceback" not in out.stderr
    monkeypatch.setenv("PAGODA_PORT", "eighty")
    with pytest.raises(SystemExit, match=r"^pagoda: PAGODA_PORT='eighty' is not a valid int$"):
        build_parser()


def test_subcommands_dispatch_to_their_runners(monkeypatch, tmp_path):
    import pagoda.cli.bench
    import pagoda.supervisor
    import scheduler_svc.service

    served = []
    monkeypatch.setattr(pagoda.supervisor, "serve", lambda config: served.append(config) or 3)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "8123"])
    assert e.value.code == 3 and served[0].port == 8123

    started = []
    # Leave the test process's own signal handlers and logging alone.
    monkeypatch.setattr(roles, "_exit_on_sigterm", lambda: None)
    monkeypatch.setattr(roles, "_setup_logging", lambda config, name: None)
    monkeypatch.setattr(scheduler_svc.service, "run_scheduler", started.append)
    with pytest.raises(SystemExit) as e:
        main(["scheduler", "--run-dir", str(tmp_path)])
    assert e.value.code == 0
    # Members started by hand agree on their sockets through the run directory.
    assert started[0].scheduler_addr == f"ipc://{tmp_path}/scheduler.sock"
    assert started[0].frontend_addr == f"ipc://{tmp_path}/frontend.sock"

    benched = []
    monkeypatch.setattr(pagoda.cli.bench, "run_bench", lambda args: benched.append(args) or 4)
    with pytest.raises(SystemExit) as e:
        main(["bench", "throughput", "--max-num-seqs", "2", "6"])
    assert e.value.code == 4 and (benched[0].workload, benched[0].max_num_seqs) == ("throughput", [2, 6])
