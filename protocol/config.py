"""`EngineConfig`: one Struct, built from CLI flags or `PAGODA_*` variables, given to every process.

Every field is a flag (`max_num_seqs` -> `--max-num-seqs`, as vLLM names them) and a `PAGODA_*`
environment variable (`PAGODA_MAX_NUM_SEQS`); a flag wins over the variable.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import types
import typing

import msgspec

# The formats `--tool-call-parser` reads (frontend/tool_parsers.py implements each).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
# `--kv-cache-dtype` values (vLLM's names): "auto" is the model's dtype, the fp8 ones e4m3.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")


DEFAULT_BLOCK_SIZE = 16
# An fp8 cache's blocks hold a whole key tile of `kernels.triton_decode_fp8` (64 keys): a tile's
# block id is then one load, and its K rows and V runs lie in one block. Measured on the H200
# (docs/BENCHMARKS.md, twenty-first session): decode attention at workload T's shape 116.0 -> 92.8
# us, T over the fp8 cache 30,276 -> 34,731 output tok/s; the bf16 kernel gains nothing (173.3
# against 173.1 us), so 16-bit caches keep vLLM's 16.
FP8_DEFAULT_BLOCK_SIZE = 64


def default_block_size(kv_cache_dtype: str) -> int:
    """`--block-size`'s default for this `--kv-cache-dtype`."""
    return FP8_DEFAULT_BLOCK_SIZE if kv_cache_dtype in FP8_KV_CACHE_DTYPES else DEFAULT_BLOCK_SIZE


class EngineConfig(msgspec.Struct, kw_only=True):
    # model
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None
    revision: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    # "auto": the checkpoint's weights; "dummy" (vLLM's name): random weights made on the device
    # at load, only config.json read, for benchmarks of shapes too large to save.
    load_format: str = "auto"
    # None (or "gguf"): a GGUF's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K matrices stay quantized on the CPU
    # (4-bit kernels, bf16 matmuls), and an FP8 checkpoint (compressed-tensors, fbgemm_fp8) loads
    # as FP8; "none": every weight dequantized to `dtype` at load; "fp8" (vLLM's): the decoder
    # layers' linears in FP8 (W8A8), made at load from a 16/32-bit checkpoint if it is not FP8.
    quantization: str | None = None
    # With FP8 weights (--quantization fp8, or an FP8 checkpoint): an untied LM head in FP8 too,
    # a scale per vocabulary row, made at load. A decode step then reads half its bytes
    # (llama3-8b: 1.05 -> 0.53 GB of a step's 8 GB). Off by default: vLLM keeps the LM head in
    # 16 bits. A tied head (the embedding's matrix) stays 16-bit.
    fp8_lm_head: bool = False
    device: str = "auto"
    max_model_len: int | None = None
    chat_template: str | None = None
    seed: int = 0
    # KV cache
    # Slots a KV block. None: 16 (vLLM's default), or 64 with an fp8 KV cache, where the fp8 decode
    # kernel's 64-key tiles then each lie in one block (`default_block_size`).
    block_size: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float | None = None  # CPU: KV pool size; GPU: overrides the profile
    num_gpu_blocks_override: int | None = None
    # "auto": K/V stored in the model's dtype; "fp8" / "fp8_e4m3": float8 e4m3 with a scale per
    # layer for K and for V (1.0 when the checkpoint gives none), twice the blocks in the memory.
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    # scheduling
    max_num_seqs: int = 256
    # Tokens per step; None: 8192 on a GPU (vLLM's serving default on large GPUs), 2048 on
    # the CPU. The worker resolves it for its device and tells the scheduler.
    max_num_batched_tokens: int | None = None
    # Plan step n+1 while the worker runs step n (at most 2 steps in flight), so the worker
    # does not wait on the scheduler between steps; off: one step at a time.
    async_scheduling: bool = True
    # Admission (vLLM's max_num_queued_reqs): past this many requests waiting, or this many
    # prompt tokens waiting (estimated before tokenizing), new ones get 503 with Retry-After.
    max_num_queued_reqs: int = 4096
    max_num_queued_tokens: int = 1 << 20
    tensor_parallel_size: int = 1
    # Worker groups (model replicas) joined to the one scheduler; `pagoda serve` starts this
    # many, each of tensor_parallel_size ranks on its own GPUs (vLLM's --data-parallel-size).
    data_parallel_size: int = 1
    # Where the ranks of a tensor-parallel worker group meet (torch.distributed's init_method,
    # tcp://HOST:PORT, HOST being rank 0's); empty: `pagoda serve` picks a free local port.
    distributed_init_method: str = ""
    enforce_eager: bool = False
    # Also capture CUDA graphs for steps with prefill chunks, at token counts 16, 32, ... up
    # to this many (padded up to the next). 0: such steps run eagerly. Experimental: the
    # graphs hold their own activations (about one eager step's worth at the largest size).
    cuda_graph_mixed_tokens: int = 0
    # serving
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_file: str = ""  # the API key read from this file (a mounted secret) instead
    # ZeroMQ over tcp://: CURVE keys from `pagoda keys generate DIR`: the public keys of every
    # role (DIR/public) and this process's own secret key file. Without them tcp:// refuses to
    # start unless insecure_transport is set; ipc:// (one machine, a 0700 folder) needs none.
    curve_public_keys_dir: str = ""
    curve_secret_key_file: str = ""
    insecure_transport: bool = False
    num_tokenizers: int = 2
    run_dir: str = ""
    frontend_addr: str = ""
    scheduler_addr: str = ""
    heartbeat_interval_s: float = 1.0
    # Steps in flight and no result for this long: the worker group is declared hung and its
    # requests wait for the next one. Generous, since a CPU step of a long prompt takes seconds.
    step_timeout_s: float = 60.0
    # SIGTERM: new requests get 503 while the running ones have this many seconds to finish;
    # the rest then end with an error. Keep compose's stop_grace_period above it.
    shutdown_timeout: float = 30.0
    # Streamed responses send a chunk every this many tokens of a sample (its first token and its
    # end at once; vLLM's --stream-interval): fewer, larger chunks, the same text.
    stream_interval: int = 1
    # Tool calling (vLLM's flags): tool_choice "auto" needs both; the parser reads tool calls out
    # of the model's text in its family's format (one of TOOL_CALL_PARSERS).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str = ""
    # Speculative decoding (vLLM's --speculative-config): a JSON object of SpeculativeConfig's
    # fields, e.g. {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}.
    speculative_config: str | None = None
    log_level: str = "info"
    step_log: str | None = None  # a JSON line per scheduled step, for tests and debugging

    def __post_init__(self) -> None:
        if self.block_size is None:
            self.block_size = default_block_size(self.kv_cache_dtype)
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")

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
            distributed_init_method=self.distributed_init_method
            or (f"tcp://127.0.0.1:{_free_port()}" if self.tensor_parallel_size > 1 else ""),
        )

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """`speculative_config` parsed (ValueError if it is not valid)."""
        return SpeculativeConfig.parse(self.speculative_config) if self.speculative_config else None

    @property
    def model_name(self) -> str:
        """The name clients use in the `model` field."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or EMBEDDED_MODEL_NAME


EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
SPECULATIVE_METHODS = ("ngram", "draft_model")


class SpeculativeConfig(msgspec.Struct, forbid_unknown_fields=True):
    """vLLM's speculative_config fields. "ngram" (prompt lookup): the scheduler proposes the
    tokens that followed the latest earlier occurrence of the sequence's last n tokens
    (n from prompt_lookup_max down to prompt_lookup_min). "draft_model": a draft-model worker
    (`pagoda draft-worker`, its own process) runs `model` greedily for num_speculative_tokens
    tokens (the target's vocabulary required). Either way the worker verifies the drafts of a
    request in one forward and keeps the target's tokens exactly (scheduler_svc/speculation.py).
    `disable_by_batch_size`: no drafts in a step that runs more requests than this (a large
    batch is bound by compute, where verifying drafts costs more than it saves)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None  # the draft model (method "draft_model")
    disable_by_batch_size: int = 4

    @classmethod
    def parse(cls, text: str) -> SpeculativeConfig:
        try:
            spec = msgspec.json.decode(text, type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise ValueError(f"speculative_config: {e}") from None
        if spec.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config: method {spec.method!r} is not supported "
                             f"(supported: {', '.join(SPECULATIVE_METHODS)})")
        if spec.num_speculative_tokens < 1:
            raise ValueError("speculative_config: num_speculative_tokens must be at least 1")
        if spec.method == "draft_model":
            if not spec.model:
                raise ValueError("speculative_config: method draft_model needs model (the draft model's path or name)")
            return spec
        hi = spec.prompt_lookup_max or spec.prompt_lookup_min or 4
        lo = spec.prompt_lookup_min or min(2, hi)
        if not 1 <= lo <= hi:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min ({lo}) <= prompt_lookup_max ({hi})")
        return msgspec.structs.replace(spec, prompt_lookup_max=hi, prompt_lookup_min=lo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode_config(config: EngineConfig) -> str:
    return msgspec.json.encode(config).decode()


def decode_config(text: str) -> EngineConfig:
    return msgspec.json.decode(text, type=EngineConfig)


def _field_type(annotation: typing.Any) -> type:
    """The scalar type behind `int | None` and the like."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineConfig` field, its default from `PAGODA_<FIELD>` when that is set."""
    hints = typing.get_type_hints(EngineConfig)
    for f in msgspec.structs.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        var = "PAGODA_" + f.name.upper()
        env = os.environ.get(var)
        typ = _field_type(hints[f.name])
        if typ is bool:
            default = f.default if env is None else env.lower() in ("1", "true", "yes", "on")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            continue
        try:
            default = f.default if env is None else typ(env)
        except ValueError:
            raise SystemExit(f"pagoda: {var}={env!r} is not a valid {typ.__name__}") from None
        parser.add_argument(flag, type=typ, default=default, metavar=f.name.upper())
    parser.add_argument("--config-json", help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The configuration: whole from --config-json or $PAGODA_ENGINE_CONFIG (how `pagoda serve`
    hands it to its children), else from the flags and PAGODA_* variables."""
    if args.config_json:
        return decode_config(args.config_json)
    if os.environ.get("PAGODA_SUPERVISED") and os.environ.get("PAGODA_ENGINE_CONFIG"):
        return decode_config(os.environ["PAGODA_ENGINE_CONFIG"])
    values = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(EngineConfig)}
    try:
        config = EngineConfig(**values)
    except (TypeError, ValueError, msgspec.ValidationError) as e:
        raise SystemExit(f"pagoda: invalid configuration: {e}") from None
    if config.kv_cache_dtype not in KV_CACHE_DTYPES:
        known = ", ".join(KV_CACHE_DTYPES)
        raise SystemExit(f"pagoda: --kv-cache-dtype {config.kv_cache_dtype!r} is not one of {known}")
    if config.stream_interval < 1:
        raise SystemExit(f"pagoda: --stream-interval must be at least 1, got {config.stream_interval}")
    if config.tool_call_parser and config.tool_call_parser not in TOOL_CALL_PARSERS:
        known = ", ".join(TOOL_CALL_PARSERS)
        raise SystemExit(f"pagoda: --tool-call-parser {config.tool_call_parser!r} is not one of {known}")
    try:
        config.speculative  # noqa: B018 (parsed to be checked)
    except ValueError as e:
        raise SystemExit(f"pagoda: --{e}".replace("speculative_config", "speculative-config", 1)) from None
    if config.enable_auto_tool_choice and not config.tool_call_parser:
        raise SystemExit("pagoda: --enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(TOOL_CALL_PARSERS)})")
    return config
