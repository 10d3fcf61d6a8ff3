"""Write a tiny Hugging Face Llama/Qwen2/Qwen3 model as a GGUF file, the way llama.cpp's converter does.

Tensors get llama.cpp's names and (for the llama architecture) its q/k row order, and each
matrix is stored in a chosen quantization. numpy in `gguf` can quantize F16/BF16/Q8_0/Q4_0/
Q4_1 but not the K-quants, so Q4_K and Q6_K matrices are random blocks with small scales:
the test then compares against transformers reading the very same file.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

Q = gguf.GGMLQuantizationType

LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Byte offsets of the fp16 scales in a block of these K-quants, patched to keep values small.
K_QUANT_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def gguf_name(hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, index, rest = base.split(".", 3)
        return f"blk.{index}.{LAYER_NAMES[rest]}.{suffix}"
    return f"{GLOBAL_NAMES[base]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for the llama architecture (interleaved rope pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in K_QUANT_SCALES:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = values.shape
        blocks = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
        for offset in K_QUANT_SCALES[qtype]:
            blocks[..., offset : offset + 2] = np.frombuffer(np.float16(3e-4).tobytes(), dtype=np.uint8)
        return blocks.reshape(rows, -1)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def write_gguf(
    model: PreTrainedModel,
    path: Path,
    arch: str,
    qtypes: list[Q],
    eos_token_id: int,
    rope_freqs: list[float] | None = None,
    seed: int = 0,
) -> None:
    """Write `model` as `arch` ("llama", "qwen2", "qwen3"), matrices cycling through `qtypes`
    (1-D tensors stay F32, as in llama.cpp)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_vocab_size(config.vocab_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_eos_token_id(eos_token_id)
    rng = np.random.default_rng(seed)
    matrices = 0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            values = llama_cpp_permute(values, heads)
        qtype = Q.F32
        if values.ndim == 2:
            qtype, matrices = qtypes[matrices % len(qtypes)], matrices + 1
        data = encode(values, qtype, rng)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama3_rope_freqs(rope: dict, head_dim: int) -> list[float]:
    """llama.cpp's converter's rope_freqs for a llama3-scaled rope: one divisor per frequency."""
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors
