"""tests/compose/services.py: compose.yaml's services as local processes (interpolation, hosts,
ports, secrets, the tokenizer's shell entrypoint)."""

from __future__ import annotations

import sys

import pytest

from tests.compose.services import (
    COMPOSE_DIR,
    InterpolationError,
    interpolate,
    pagoda_invocations,
    service_environment,
    service_process,
)

PORTS = {8000: 18000, 5556: 15556, 5557: 15557}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A}", {}, ""),
        ("$A/b", {"A": "x"}, "x/b"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A-d}", {}, "d"),
        ("${A:-${B:-./keys}/api_key}", {}, "./keys/api_key"),
        ("${A:-${B:-./keys}/api_key}", {"B": "/k"}, "/k/api_key"),
        ("${A:-${B:-./keys}/api_key}", {"A": "/a", "B": "/k"}, "/a"),
        ("${A:+on}", {"A": "1"}, "on"),
        ("${A:+on}", {}, ""),
        ("$${HOSTNAME} $$@ $$", {"HOSTNAME": "h"}, "${HOSTNAME} $@ $"),
        ("${A:?}", {"A": "set"}, "set"),
    ],
)
def test_interpolate(text, env, expected):
    assert interpolate(text, env) == expected


@pytest.mark.parametrize("text", ["${A:?A is required}", "${A?}", "${A", "${-x}"])
def test_interpolate_errors(text):
    with pytest.raises(InterpolationError):
        interpolate(text, {})


def test_frontend_runs_on_loopback_with_its_secrets(tmp_path):
    env = {"PAGODA_KEYS_DIR": str(tmp_path), "PAGODA_NUM_TOKENIZERS": "4", "PAGODA_MODEL": "gpt2"}
    proc = service_process("frontend", env, ports=PORTS, pagoda=[sys.executable, "-m", "pagoda"])
    argv = proc.argv
    assert argv[:4] == [sys.executable, "-m", "pagoda", "frontend"]
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == "18000"
    assert flag(argv, "--frontend-addr") == "tcp://127.0.0.1:15556"
    assert flag(argv, "--num-tokenizers") == "4"
    assert flag(argv, "--api-key-file") == str(tmp_path / "api_key")
    assert flag(argv, "--curve-secret-key-file") == str(tmp_path / "secret" / "frontend.key_secret")
    assert flag(argv, "--curve-public-keys-dir") == str(tmp_path / "public")
    # Variables without a value in compose.yaml come from env only when it has them.
    assert proc.env["PAGODA_MODEL"] == "gpt2" and proc.env["HF_HUB_OFFLINE"] == "1"
    assert "PAGODA_REVISION" not in proc.env


def test_defaults_without_env():
    proc = service_process("frontend")
    assert flag(proc.argv, "--num-tokenizers") == "2"
    assert flag(proc.argv, "--port") == "8000"
    assert flag(proc.argv, "--api-key-file") == str((COMPOSE_DIR / "keys" / "api_key").resolve())
    assert "PAGODA_MODEL" not in proc.env
    assert flag(service_process("frontend", {"PAGODA_API_KEY_HOST_FILE": "/k/key"}).argv, "--api-key-file") == "/k/key"


def test_tokenizer_entrypoint_is_unwrapped_with_a_member_id_per_replica(tmp_path):
    env = {"PAGODA_KEYS_DIR": str(tmp_path)}
    first = service_process("tokenizer", env, ports=PORTS, replica=1).argv
    second = service_process("tokenizer", env, ports=PORTS, replica=2).argv
    assert first[:4] == ["pagoda", "tokenizer", "--member-id", "tokenizer-pagoda-tokenizer-1"]
    assert flag(second, "--member-id") == "tokenizer-pagoda-tokenizer-2"
    assert flag(first, "--frontend-addr") == "tcp://127.0.0.1:15556"
    assert flag(first, "--scheduler-addr") == "tcp://127.0.0.1:15557"
    assert flag(first, "--curve-secret-key-file") == str(tmp_path / "secret" / "tokenizer.key_secret")
    assert first[4:] == second[4:]


def test_ports_stay_without_a_mapping():
    argv = service_process("worker-0").argv
    assert argv[:6] == ["pagoda", "worker", "--group", "0", "--rank", "0"]
    assert flag(argv, "--scheduler-addr") == "tcp://127.0.0.1:5557"
    assert flag(service_process("scheduler").argv, "--scheduler-addr") == "tcp://127.0.0.1:5557"


def test_a_shell_script_that_is_not_one_exec_is_refused():
    # The keys tool runs a script of several commands: not one process.
    with pytest.raises(ValueError, match="exec"):
        service_process("keys")


def test_pagoda_invocations_read_shell_scripts():
    keys = {"entrypoint": ["sh", "-ec"], "command": ["pagoda keys generate /keys; chown -R 1000 /keys"]}
    assert pagoda_invocations(keys) == [["keys", "generate", "/keys"]]
    wrapped = {"entrypoint": ["sh", "-c", 'exec pagoda tokenizer --member-id "t-${HOSTNAME}" "$@"', "tokenizer"],
               "command": ["--frontend-addr", "tcp://frontend:5556"]}
    assert pagoda_invocations(wrapped) == [
        ["tokenizer", "--member-id", "t-${HOSTNAME}", "--frontend-addr", "tcp://frontend:5556"]
    ]
    assert pagoda_invocations({"command": ["scheduler", "--scheduler-addr", "tcp://0.0.0.0:5557"]}) == [
        ["scheduler", "--scheduler-addr", "tcp://0.0.0.0:5557"]
    ]
    assert pagoda_invocations({"entrypoint": ["hf"], "command": ["--help"]}) == []


def test_environment_list_form():
    service = {"environment": ["A=1", "B", "C"]}
    assert service_environment(service, {"B": "2"}) == {"A": "1", "B": "2"}
