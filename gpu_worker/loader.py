"""Find a model's weights, build its module and load them: Hugging Face folders, the hub cache, GGUF.

Every format comes down to the same `Checkpoint`: a Hugging Face-style config dict (whose
`architectures` picks the model class), the EOS token ids, and a stream of tensors named the
Hugging Face way. Every failure a user can cause (a missing model, an unsupported
architecture, a damaged file) is a `ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from gpu_worker import fp8, int4
from gpu_worker.checkpoint import Checkpoint, read_hf_folder
from gpu_worker.dummy_weights import LOAD_FORMATS, fill_dummy_weights, read_config_only
from gpu_worker.gguf_checkpoint import read_gguf
from gpu_worker.model_config import build_model_config
from gpu_worker.models import MODEL_REGISTRY
from gpu_worker.models.base import CausalLM
from protocol.config import EMBEDDED_MODEL_NAME, EngineConfig
from tokenizer_svc.model_source import ModelLoadError, embedded_gguf_path, resolve_model_path

__all__ = ["LoadedModel", "ModelLoadError", "embedded_gguf_path", "load_model", "read_checkpoint", "resolve_dtype"]

logger = logging.getLogger(__name__)

QUANTIZATIONS = (None, "gguf", "none", "fp8", "gptq", "awq")

DTYPES = {
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float": torch.float32,
}


@dataclass
class LoadedModel:
    model: CausalLM
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    dtype: torch.dtype
    device: torch.device


def load_model(config: EngineConfig, device: torch.device) -> LoadedModel:
    """Load `config.model` (None: the embedded GGUF; a .gguf file; a folder; a hub id in the cache)
    at `config.revision`, in `config.dtype`, onto `device`."""
    name = config.model or EMBEDDED_MODEL_NAME
    if config.load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format {config.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    dummy = config.load_format == "dummy"  # random weights made on the device; only config.json read
    began = time.perf_counter()
    torch.empty(1, device=device)  # the device's context, timed apart from the weights
    logger.info("loading %s (process up %.1f s, device set up in %.1f s)", name, _process_age_s(),
                time.perf_counter() - began)
    began = time.perf_counter()
    if dummy:
        checkpoint = read_config_only(config.model, config.revision)
    else:
        # On the CPU a GGUF's 4/8-bit matrices stay quantized (gpu_worker/gguf_quant.py); on a
        # GPU, and split over ranks, they are dequantized to the model's dtype as they load.
        if config.quantization not in QUANTIZATIONS:
            raise ModelLoadError(f"quantization {config.quantization!r} is not one of gguf, none, fp8, gptq, awq")
        keep_quantized = (config.quantization not in ("none", "fp8") and device.type == "cpu"
                          and config.tensor_parallel_size == 1)
        checkpoint = read_checkpoint(config.model, config.revision, keep_quantized)
    hf_config = checkpoint.hf_config
    architecture = (hf_config.get("architectures") or ["(none given)"])[0]
    model_class = MODEL_REGISTRY.get(architecture)
    if model_class is None:
        raise ModelLoadError(
            f"{name}: architecture {architecture} is not supported (supported: {', '.join(MODEL_REGISTRY)})"
        )
    try:
        model_config = build_model_config(model_class, hf_config)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{name}: config.json does not fit {architecture}: {e!r}") from None
    try:  # 4-bit linears (gpu_worker/int4.py): read from a GPTQ / AWQ checkpoint
        int4_plan = int4.checkpoint_int4_plan(hf_config)
    except ValueError as e:
        raise ModelLoadError(f"{name}: {e}") from None
    fp8_plan = None
    if int4_plan is not None:
        if config.quantization not in (None, int4_plan.method):
            raise ModelLoadError(f"{name}: the checkpoint is {int4_plan.method.upper()} (4-bit); --quantization "
                                 f"{config.quantization} is not supported for it (leave it unset or give "
                                 f"{int4_plan.method})")
    elif config.quantization in int4.INT4_METHODS:
        if not dummy:
            raise ModelLoadError(f"{name}: --quantization {config.quantization} needs a {config.quantization.upper()} "
                                 "checkpoint (config.json's quantization_config)")
        int4_plan = int4.Int4Plan("rtn", int4.DUMMY_GROUP_SIZE)  # random weights: quantized at load
    else:
        try:  # FP8 linears (gpu_worker/fp8.py): made from this checkpoint, or read from an FP8 one
            fp8_plan = fp8.plan_fp8(config.quantization, hf_config)
        except ValueError as e:
            raise ModelLoadError(f"{name}: {e}") from None
    if dummy and int4_plan is not None:
        int4_plan = int4.Int4Plan("rtn", int4.DUMMY_GROUP_SIZE)
    if fp8_plan is not None and dummy:  # random weights: quantized like a 16-bit checkpoint's
        fp8_plan = fp8.Fp8Plan(quantize=True)
    dtype = resolve_dtype(config.dtype, device, checkpoint.dtype)
    # Built on the meta device: no memory and no random init for weights we overwrite anyway.
    with torch.device("meta"):
        module = model_class(model_config)
    module = materialize(module.to(dtype), device)
    if dummy:
        fill_dummy_weights(module, config.seed)
    else:
        tensors = tqdm(checkpoint.tensors, total=checkpoint.num_tensors, desc=f"Loading {name}")
        try:
            if fp8_plan is not None and not fp8_plan.quantize:
                tensors = fp8.prepare_checkpoint(module, checkpoint, tensors)
            if int4_plan is not None:
                int4.prepare_checkpoint(module, checkpoint)
            module.load_weights(tensors)
        except ValueError as e:
            raise ModelLoadError(f"{name}: {e}") from None
    if config.fp8_lm_head and fp8_plan is None:
        raise ModelLoadError(f"{name}: fp8_lm_head needs FP8 weights (--quantization fp8, or an FP8 checkpoint)")
    num_fp8 = fp8.finish(module, fp8_plan, lm_head=config.fp8_lm_head) if fp8_plan is not None else 0
    try:
        num_int4 = int4.finish(module, int4_plan, dtype) if int4_plan is not None else 0
    except ValueError as e:
        raise ModelLoadError(f"{name}: {e}") from None
    module.eval()
    kept = sum(getattr(m, "int4", None) is not None for m in module.modules())
    logger.info("loaded %s (%s) in %s on %s in %.1f s%s%s%s%s", name, architecture, str(dtype).removeprefix("torch."),
                device, time.perf_counter() - began, " (dummy weights)" if dummy else "",
                f", {kept} matrices kept quantized (4-bit kernels)" if kept else "",
                f", {num_fp8} linears in FP8 ({fp8_plan.method or 'quantized at load'})" if num_fp8 else "",
                f", {num_int4} linears in 4 bits ({int4_plan.method})" if num_int4 else "")
    return LoadedModel(
        model=module,
        num_layers=model_config.num_hidden_layers,
        num_kv_heads=module.attention_layers()[0].num_kv_heads,  # this rank's
        head_dim=model_config.head_dim,
        max_position_embeddings=model_config.max_position_embeddings,
        eos_token_ids=checkpoint.eos_token_ids,
        dtype=dtype,
        device=device,
    )


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """`module.to_empty(device=device)`, each parameter and buffer made by `torch.empty` in its
    shape and dtype (a parameter two modules share stays shared). `to_empty` goes through
    `torch.empty_like` on meta tensors, whose stride logic imports sympy: half a second of every
    worker start on a small CPU, for nothing else in the worker needs it."""
    made: dict[int, nn.Parameter] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:  # a new Parameter, as `to_empty` makes for a meta one
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                               requires_grad=p.requires_grad)
                m._parameters[name] = made[id(p)]
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return module


def read_checkpoint(model: str | None, revision: str | None = None, keep_quantized: bool = False) -> Checkpoint:
    """The checkpoint behind `model`, whatever its format (`keep_quantized`: see `read_gguf`)."""
    path = resolve_model_path(model, revision)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file (for Hugging Face weights, give the folder)")
        return read_gguf(str(path), keep_quantized)
    return read_hf_folder(path)


def _process_age_s() -> float:
    """Seconds since this process started (imports and device set-up come before a load)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return uptime - started_ticks / os.sysconf("SC_CLK_TCK")


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype to run in. "auto" is float32 on the CPU (bf16 there is barely faster and no
    longer matches transformers' fp32 tokens); on a GPU it is the checkpoint's float16 or
    bfloat16, and bfloat16 for float32 and quantized (GGUF) checkpoints, as vLLM does."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
