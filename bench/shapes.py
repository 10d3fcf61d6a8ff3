"""The benchmark model shapes (docs/BENCHMARKS.md), built with random weights so no download is needed.

The weights are made once, saved as a Hugging Face folder (safetensors, bf16 on a GPU) with a
word-level tokenizer over the whole vocabulary, and both Pagoda and the `transformers` peer
load that same folder: the very same weights on both sides.
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
    # Small shapes for CPU runs and CI.
    "tiny-llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        vocab_size=512, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    ),
}


def _write_tokenizer(folder: str, vocab_size: int) -> None:
    """A word-level tokenizer whose token i is the word `t<i>`: any random id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token=f"t{vocab_size - 1}")
    fast.save_pretrained(folder)


def make_random_model(shape: str, root: str, device: str, seed: int = 0) -> str:
    """The folder of `shape` with random weights under `root`, made on `device` if missing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    folder = os.path.join(root, shape)
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")) or os.path.exists(
        os.path.join(folder, "model.safetensors")
    ):
        return folder
    spec = dict(SHAPES[shape])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.eos_token_id = spec["vocab_size"] - 1
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    _write_tokenizer(folder, spec["vocab_size"])
    with open(os.path.join(folder, "bench_shape.json"), "w") as f:
        json.dump({"shape": shape, "seed": seed}, f)
    del model
    return folder


def model_bytes_and_params(folder: str) -> tuple[int, int]:
    """Bytes and parameter count of the weights, read from the safetensors headers."""
    from safetensors import safe_open

    total_bytes = total_params = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for key in f.keys():
                    t = f.get_slice(key)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    total_params += n
                    total_bytes += n * (2 if t.get_dtype() in ("BF16", "F16") else 4)
    return total_bytes, total_params


def kv_bytes_per_token(folder: str, kv_dtype_bytes: int) -> int:
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * kv_dtype_bytes
