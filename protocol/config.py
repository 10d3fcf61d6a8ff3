"""`EngineConfig`: one Struct, built from CLI flags or `PAGODA_*` variables, given to every process."""

from __future__ import annotations

import os
import tempfile

import msgspec


class EngineConfig(msgspec.Struct, kw_only=True):
    # model
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None
    revision: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    chat_template: str | None = None
    seed: int = 0
    # KV cache
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float | None = None  # CPU: KV pool size; GPU: overrides the profile
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    # scheduling
    max_num_seqs: int = 256
    # Tokens per step; None: 8192 on a GPU (vLLM's serving default on large GPUs), 2048 on
    # the CPU. The worker resolves it for its device and tells the scheduler.
    max_num_batched_tokens: int | None = None
    # Plan step n+1 while the worker runs step n (at most 2 steps in flight), so the worker
    # does not wait on the scheduler between steps; off: one step at a time.
    async_scheduling: bool = True
    max_queue_len: int = 4096
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    # Also capture CUDA graphs for steps with prefill chunks, at token counts 16, 32, ... up
    # to this many (padded up to the next). 0: such steps run eagerly. Experimental: the
    # graphs hold their own activations (about one eager step's worth at the largest size).
    cuda_graph_mixed_tokens: int = 0
    # serving
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    num_tokenizers: int = 2
    run_dir: str = ""
    frontend_addr: str = ""
    scheduler_addr: str = ""
    heartbeat_interval_s: float = 1.0
    log_level: str = "info"
    step_log: str | None = None  # a JSON line per scheduled step, for tests and debugging

    def token_budget(self, on_gpu: bool) -> int:
        """max_num_batched_tokens, or its default for the device."""
        return self.max_num_batched_tokens or (8192 if on_gpu else 2048)

    def with_addresses(self) -> EngineConfig:
        """Fill in the run directory and ipc:// addresses that were left empty."""
        run_dir = self.run_dir or tempfile.mkdtemp(prefix="pagoda-")
        os.makedirs(run_dir, exist_ok=True)
        return msgspec.structs.replace(
            self,
            run_dir=run_dir,
            frontend_addr=self.frontend_addr or f"ipc://{run_dir}/frontend.sock",
            scheduler_addr=self.scheduler_addr or f"ipc://{run_dir}/scheduler.sock",
        )

    @property
    def model_name(self) -> str:
        """The name clients use in the `model` field."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or EMBEDDED_MODEL_NAME


EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def encode_config(config: EngineConfig) -> str:
    return msgspec.json.encode(config).decode()


def decode_config(text: str) -> EngineConfig:
    return msgspec.json.decode(text, type=EngineConfig)
