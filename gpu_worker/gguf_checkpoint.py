"""Reading a GGUF file (llama.cpp's format) as a Hugging Face-style checkpoint.

The metadata becomes a config.json-like dict, and each tensor is dequantized to fp32 by
`gguf.quants.dequantize` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants Q2_K..Q6_K and
more) and renamed the Hugging Face way, so the same model classes load it. With
`keep_quantized` (the CPU), matrices in Q4_0, Q4_1, Q4_K, Q8_0 and Q6_K stay in their blocks
instead (`GGUFQuantized`, views of the memory-mapped file) for the 4-bit kernels.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np
import torch

from gpu_worker.checkpoint import READ_ERRORS, Checkpoint
from gpu_worker.gguf_quant import KEPT_QUANTIZED, GGUFQuantized
from tokenizer_svc.model_source import ModelLoadError
from tokenizer_svc.tokenizer_loader import cache_dir, file_cache_key

logger = logging.getLogger("pagoda.worker")

# llama.cpp's architecture name -> the Hugging Face architecture and model_type it maps onto.
# (llama.cpp converts Mistral and SmolLM2 as "llama".)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# llama.cpp tensor names (after "blk.N.") -> Hugging Face names (after "model.layers.N.").
GGUF_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
ROPE_FREQS = "rope_freqs.weight"


# Metadata arrays longer than this (the vocabulary, its merges and scores) are not kept in the
# index: the worker reads none of them.
INDEX_MAX_ARRAY = 64
INDEX_VERSION = 1


def _from_index(path: str, index: str) -> tuple[dict[str, Any], list[gguf.ReaderTensor]] | None:
    """The contents an index written by `gguf_contents` describes, or None (no index, another
    version, or one that does not fit the file)."""
    try:
        with open(index) as f:
            cached = json.load(f)
        if cached.get("version") != INDEX_VERSION:
            return None
        data = np.memmap(path, mode="r")
        tensors = []
        for t in cached["tensors"]:
            view = data[t["offset"] : t["offset"] + t["nbytes"]].view(np.dtype(t["dtype"])).reshape(t["layout"])
            tensors.append(gguf.ReaderTensor(
                name=t["name"], tensor_type=gguf.GGMLQuantizationType(t["type"]),
                shape=np.array(t["shape"], dtype=np.uint64), n_elements=t["n_elements"], n_bytes=t["n_bytes"],
                data_offset=t["offset"], data=view, field=None,
            ))
        return cached["fields"], tensors
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def gguf_contents(path: str) -> tuple[dict[str, Any], list[gguf.ReaderTensor]]:
    """A GGUF file's metadata values (arrays of more than INDEX_MAX_ARRAY items left out) and
    its tensors, each a view of the memory-mapped file as `gguf.GGUFReader` gives it.

    GGUFReader parses every metadata item, the tokenizer's 49k-token vocabulary and merges one
    numpy view at a time: 3 s of each worker start on a small CPU for the embedded model. So its
    answer is kept as an index (values, and each tensor's type, shape, offset and layout) in the
    cache beside the converted tokenizers, keyed by the file's path, size and mtime; a later
    start maps the file and makes the same views from the index."""
    index = os.path.join(cache_dir(), "gguf-index", f"{file_cache_key(path)}.json")
    cached = _from_index(path, index)
    if cached is not None:
        return cached
    reader = gguf.GGUFReader(path)
    fields = {key: f.contents() for key, f in reader.fields.items() if len(f.data) <= INDEX_MAX_ARRAY}
    tensors = list(reader.tensors)
    entry = {"version": INDEX_VERSION, "fields": fields, "tensors": [
        {"name": t.name, "type": int(t.tensor_type), "shape": [int(d) for d in t.shape],
         "n_elements": int(t.n_elements), "n_bytes": int(t.n_bytes), "offset": int(t.data_offset),
         "nbytes": int(t.data.nbytes), "dtype": t.data.dtype.str, "layout": list(t.data.shape)}
        for t in tensors
    ]}
    tmp = None
    try:  # written whole, then renamed: a reader never sees half an index
        os.makedirs(os.path.dirname(index), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(index), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, index)
    except (OSError, TypeError, ValueError) as e:  # a read-only cache, a value JSON cannot hold: parse next time
        logger.info("GGUF index of %s not cached: %s", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return fields, tensors


def read_gguf(path: str, keep_quantized: bool = False) -> Checkpoint:
    try:
        fields, tensor_list = gguf_contents(path)
    except READ_ERRORS as e:
        raise ModelLoadError(f"cannot read GGUF file {path} (corrupt or incomplete?): {e}") from None

    def field(key: str, default: Any = None) -> Any:
        return fields.get(key, default)

    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    architecture, model_type = GGUF_ARCHITECTURES[arch]
    tensors = {t.name: t for t in tensor_list}
    num_heads = field(f"{arch}.attention.head_count")
    num_kv_heads = field(f"{arch}.attention.head_count_kv", num_heads)
    hidden_size = field(f"{arch}.embedding_length")
    head_dim = (
        field(f"{arch}.attention.key_length") or field(f"{arch}.rope.dimension_count") or hidden_size // num_heads
    )
    hf_config = {
        "architectures": [architecture],
        "model_type": model_type,
        # GGUF stores shapes fastest-dim first: token_embd is [hidden, vocab].
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden_size,
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": field(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": field(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if ROPE_FREQS in tensors:
        # Llama 3.1+: llama.cpp stores the llama3 rope scaling as a divisor per frequency.
        factors = _dequantize(tensors.pop(ROPE_FREQS)).flatten().tolist()
        hf_config["rope_parameters"] = {"rope_type": "freq_factors", "factors": factors}
    # eot is llama.cpp's end-of-turn token (Llama 3's <|eot_id|>): a chat reply ends there too.
    eos = [field(key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    # llama.cpp's converter reorders q/k rows for the llama architecture only.
    heads = {"attn_q": num_heads, "attn_k": num_kv_heads} if arch == "llama" else {}
    return Checkpoint(
        hf_config,
        list(dict.fromkeys(int(t) for t in eos if t is not None)),
        len(tensors),
        # Named up front: an unknown tensor fails the load before the model is built.
        _iter_tensors(path, [(_hf_name(t.name), t) for t in tensors.values()], heads, keep_quantized),
    )


# Matrices the model stacks into one projection: kept quantized all together or none of them.
STACKED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def _kept_quantized(tensors: list[tuple[str, gguf.ReaderTensor]]) -> set[str]:
    """The GGUF names of the matrices that stay in their blocks: a kept type, and so are the
    others stacked with it."""
    kept = {t.name for _, t in tensors if t.tensor_type in KEPT_QUANTIZED and len(t.shape) == 2}
    for _, t in tensors:
        base, _, suffix = t.name.rpartition(".")
        prefix, _, kind = base.rpartition(".")
        for group in STACKED:
            if kind in group and any(f"{prefix}.{other}.{suffix}" not in kept for other in group):
                kept.discard(t.name)
    return kept


def _iter_tensors(
    path: str, tensors: list[tuple[str, gguf.ReaderTensor]], heads: dict[str, int], keep_quantized: bool
) -> Iterator[tuple[str, torch.Tensor | GGUFQuantized]]:
    kept = _kept_quantized(tensors) if keep_quantized else set()
    for name, tensor in tensors:
        kind = tensor.name.split(".")[-2]
        if tensor.name in kept:
            rows = tensor.data  # [rows, bytes per row]: permuting rows moves whole rows of blocks
            if kind in heads:
                rows = _unpermute_rope_rows(rows, heads[kind])
            yield name, GGUFQuantized(tensor.tensor_type, rows, (int(tensor.shape[1]), int(tensor.shape[0])))
            continue
        try:
            values = _dequantize(tensor)
        except READ_ERRORS + (NotImplementedError,) as e:
            raise ModelLoadError(f"{path}: cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {e}") from None
        if kind in heads:
            values = _unpermute_rope_rows(values, heads[kind])
        # A copy: F32 tensors are views of the read-only memory map.
        yield name, torch.tensor(values, dtype=torch.float32)


def _dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """The tensor in fp32 with the Hugging Face (slowest-dim first) shape."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return values.reshape(tuple(reversed([int(d) for d in tensor.shape])))


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in GGUF_LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{GGUF_LAYER_TENSORS[parts[2]]}.{suffix}"
    if base in GGUF_GLOBAL_TENSORS:
        return f"{GGUF_GLOBAL_TENSORS[base]}.{suffix}"
    # An unknown tensor changes the computation somehow: running without it would be wrong.
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} is not supported")


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order, which interleaves rope pairs (GPT-J style).

    llama.cpp's converter does w.reshape(n_head, 2, half, cols).swapaxes(1, 2); Hugging Face's
    (and our) rotary embedding wants each head's two halves back as contiguous blocks.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
