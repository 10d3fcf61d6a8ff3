"""Shared fixtures: the real server (`pagoda serve`) on loopback, and tiny random models of every family."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

# The converted GGUF tokenizer is cached here, so every server after the first starts fast.
os.environ.setdefault("PAGODA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "pagoda-test-cache"))
# Servers started by the tests (`pagoda serve`, `pagoda bench`: flags default from PAGODA_*)
# dequantize the embedded GGUF to fp32, where a request's tokens do not depend on the batch
# around it, on chunking or on a restart's recomputation: the end-to-end tests compare texts
# across those exactly. The CPU's default 4-bit path (bf16 matmuls) may flip a near-tie there;
# it is tested on its own (tests/e2e/test_serve_models.py, tests/frontend/test_offline_llm.py,
# whose `LLM` takes no PAGODA_* defaults, and tests/worker/test_model_runner.py).
os.environ.setdefault("PAGODA_QUANTIZATION", "none")


def _interpret_triton_without_a_gpu() -> None:
    """Without a GPU the Triton kernel tests run in Triton's interpreter, which triton picks when
    it is first imported, and importing transformers' model classes (tests/tiny_models.py) imports
    triton: so it is set here, before any test module is collected. (The compile checks run in
    subprocesses without it.) Otherwise the kernel tests rerun themselves in a fresh process."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_a_gpu()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    tiny matmuls gain nothing from threads, and on a busy shared CPU two OpenMP threads that wait
    on each other make each one ~50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    step_log: str
    log_path: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def steps(self) -> list[dict]:
        import json

        with open(self.step_log) as f:
            return [json.loads(line) for line in f if line.strip()]

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def start_server(tmp_dir: str, *args: str, timeout: float = 300) -> Server:
    port = free_port()
    step_log = os.path.join(tmp_dir, f"steps-{port}.jsonl")
    log_path = os.path.join(tmp_dir, f"server-{port}.log")
    cmd = [sys.executable, "-m", "pagoda", "serve", "--port", str(port),
           "--step-log", step_log, "--log-level", "info", *args]
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, port, step_log, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pagoda serve exited with {proc.returncode}:\n{server.log()[-5000:]}")
        try:
            if httpx.get(server.base_url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()[-5000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One server on the embedded model for the whole session, as a user would start it."""
    srv = start_server(str(tmp_path_factory.mktemp("server")), "--max-model-len", "1024",
                       "--num-tokenizers", "2")
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


# ---- transformers on the embedded GGUF (the reference of the SmolLM2 tests) -------------


@pytest.fixture(scope="session")
def smollm2_gguf_tokenizer():
    """transformers' tokenizer read straight from the embedded GGUF file (not Pagoda's cached copy)."""
    from transformers import AutoTokenizer

    from tokenizer_svc.model_source import embedded_gguf_path

    directory, file = os.path.split(embedded_gguf_path())
    return AutoTokenizer.from_pretrained(directory, gguf_file=file)


@pytest.fixture(scope="session")
def smollm2_gguf_hf_model():
    """transformers' model on the embedded GGUF, dequantized to fp32 by transformers (once per
    cache: `hf_folder_for_gguf` saves it, as `pagoda bench`'s peers load it). Read only: a test
    that moves it to a device moves a copy."""
    import torch
    from transformers import AutoModelForCausalLM

    from bench.workloads import hf_folder_for_gguf
    from tokenizer_svc.model_source import embedded_gguf_path

    return AutoModelForCausalLM.from_pretrained(hf_folder_for_gguf(embedded_gguf_path()), dtype=torch.float32)


# ---- tiny random models of every family (tests/tiny_models.py) -------------------------


@pytest.fixture(scope="session")
def tokenizer():
    from tests.tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer):
    """(family, init) -> (folder, transformers model), each built once."""
    from tests.tiny_models import WIDE_INIT, build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[str, float], tuple[Path, Any]] = {}

    def get(family: str, init: float = WIDE_INIT) -> tuple[Path, Any]:
        if (family, init) not in built:
            folder = root / f"{family}-{init}"
            built[family, init] = (folder, build_tiny_model(family, folder, tokenizer, init=init))
        return built[family, init]

    return get
