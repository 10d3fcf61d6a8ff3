"""The benchmark model shapes (docs/BENCHMARKS.md), built with random weights so no download is needed.

The weights are made once, saved as a Hugging Face folder (safetensors, bf16 on a GPU) with a
byte-level tokenizer over the whole vocabulary, and both Pagoda and the `transformers` peer
load that same folder: the very same weights on both sides.

Shapes too large to save (CONFIG_ONLY: llama3-70b, 141 GB in bf16) get a folder with only
config.json and the tokenizer; Pagoda makes their weights on the GPUs (`--load-format dummy`),
and there is no peer, which would need the weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
        vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=40960,
        rms_norm_eps=1e-6,
    ),
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    # Llama 3 70B (config only: random weights made at load, --load-format dummy).
    "llama3-70b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, intermediate_size=28672,
        vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    # Small shapes for CPU runs and CI.
    "tiny-llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        vocab_size=512, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    ),
}
# Shapes whose folder holds no weights, only config.json and the tokenizer: too large to save.
CONFIG_ONLY: frozenset[str] = frozenset({"llama3-70b"})


def _write_tokenizer(folder: str, vocab_size: int) -> None:
    """A byte-level tokenizer whose tokens are the 256 bytes, then the words ` t<i>`: any random
    id decodes, and JSON can be spelled (structured outputs run on these shapes as on a real
    vocabulary of the same size: llguidance walks every token's bytes to build its masks)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"\u0120t{i}": i for i in range(len(vocab), vocab_size)})  # \u0120: byte-level's space
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"\u0120t{vocab_size - 1}")
    fast.save_pretrained(folder)


def make_random_model(shape: str, root: str, device: str, seed: int = 0, weights: bool | None = None) -> str:
    """The folder of `shape` with random weights under `root`, made on `device` if missing.

    `weights` False (the default for CONFIG_ONLY shapes): config.json and the tokenizer only,
    for `--load-format dummy`; a folder that already has weights is returned as it is.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if weights is None:
        weights = shape not in CONFIG_ONLY
    folder = os.path.join(root, shape)
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")) or os.path.exists(
        os.path.join(folder, "model.safetensors")
    ):
        return folder
    marker = os.path.join(folder, "bench_shape.json")
    if not weights and os.path.exists(marker) and os.path.exists(os.path.join(folder, "config.json")):
        return folder
    spec = dict(SHAPES[shape])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.eos_token_id = spec["vocab_size"] - 1
    os.makedirs(folder, exist_ok=True)
    if weights:
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(folder)
        del model
    else:
        config.dtype = dtype  # what `--dtype auto` runs the dummy weights in, as for saved ones
        config.save_pretrained(folder)
    _write_tokenizer(folder, spec["vocab_size"])
    with open(marker, "w") as f:
        json.dump({"shape": shape, "seed": seed, "weights": weights}, f)
    return folder


def model_bytes_and_params(folder: str) -> tuple[int, int]:
    """Bytes and parameter count of the weights, read from the safetensors headers; for a
    folder without them (a CONFIG_ONLY shape), counted from config.json."""
    from safetensors import safe_open

    files = [name for name in os.listdir(folder) if name.endswith(".safetensors")]
    if not files:
        return config_bytes_and_params(folder)
    total_bytes = total_params = 0
    for name in files:
        with safe_open(os.path.join(folder, name), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                total_params += n
                total_bytes += n * (2 if t.get_dtype() in ("BF16", "F16") else 4)
    return total_bytes, total_params


def config_bytes_and_params(folder: str) -> tuple[int, int]:
    """Bytes and parameter count of the model config.json describes: the transformers model
    built on the meta device (no memory), tied weights counted once as in a saved file; bytes
    in config.json's dtype (2 a parameter for bf16/fp16, else 4)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return params * (2 if dtype in (torch.bfloat16, torch.float16) else 4), params


def kv_bytes_per_token(folder: str, kv_dtype_bytes: int) -> int:
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * kv_dtype_bytes
