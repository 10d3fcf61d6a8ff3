"""The Llama family of decoders in plain PyTorch: Llama 1/2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3.

They share one block (RMSNorm, rotary attention with GQA, SwiGLU MLP) and differ only in
flags read from the config: Qwen2 has biases on q/k/v, Qwen3 normalizes q and k per head,
Llama 3.1 scales its rope. The model runs on a flattened batch (the tokens of many sequences
laid end to end, each with its position), and attention finds each sequence's context in the
paged KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.attention import Attention, AttentionMetadata
from gpu_worker.layers import (
    HeadSplit,
    MergedLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from gpu_worker.model_config import rope_parameters
from gpu_worker.models.base import CausalLM
from gpu_worker.parallel import tp
from kernels import cpu_native, native_enabled, silu_and_mul

CosSin = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a Hugging Face config.json dict (`gpu_worker.model_config` checks it first)."""
        rope = rope_parameters(hf)
        model_type = hf.get("model_type")
        num_heads = hf["num_attention_heads"]
        # Llama and Qwen3 put `attention_bias` on all four projections; Qwen2 has q/k/v bias
        # always and no o bias.
        attention_bias = hf.get("attention_bias", False)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            rope_scaling=rope or None,
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            qk_norm=model_type == "qwen3",
        )


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        split = HeadSplit(heads, kv_heads, head_dim)
        self.qkv_proj = MergedLinear(config.hidden_size, split.full_sizes, bias=config.qkv_bias, shards=split.shards)
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=config.o_bias)
        # Qwen3 RMS-normalizes each head of q and k before rope.
        qk_norm_eps = config.rms_norm_eps if config.qk_norm else None
        self.attn = Attention(split.num_heads, split.num_kv_heads, head_dim, qk_norm_eps=qk_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        return self.o_proj(self.attn(qkv, meta, cos_sin))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size], bias=config.mlp_bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin: CosSin, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP's output, the residual stream before it), so the next norm adds them fused."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_and_norm(self.self_attn(h, cos_sin, meta), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )

        # (the layers' KV caches, the C stack over them or None): kernels/cpu_native.py's DecoderStack
        self._native: tuple[list[tuple[torch.Tensor, torch.Tensor]], cpu_native.DecoderStack | None] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cos_sin = self.rotary_emb.cos_sin(positions)
        h = self.embed_tokens(input_ids)
        stack = self._native_stack(h, meta)
        done = None if stack is None else stack(h, *cos_sin, meta.slot_mapping, meta.block_tables, meta.seq_lens)
        if done is not None:
            h, residual = done
        else:
            residual = None
            for layer in self.layers:
                h, residual = layer(h, residual, cos_sin, meta)
        return self.norm.add_and_norm(h, residual)[0]

    def _native_stack(self, h: torch.Tensor, meta: AttentionMetadata) -> cpu_native.DecoderStack | None:
        """On the CPU, for a step of decodes only (one token a sequence), every layer in one C call
        (`pg_decoder_layers`: the same operators, the same numbers, none of the ~25 Python
        dispatches a layer costs) where all four projections are 4-bit (a GGUF's), there are no
        biases and no tensor parallelism; else None, and the layers run one by one."""
        if not native_enabled(h) or meta.num_decodes != len(meta.seq_lens) or h.shape[0] != meta.num_decodes:
            return None
        attns = [layer.self_attn.attn for layer in self.layers]
        if self._native is None or any(
            a.k_cache is not k or a.v_cache is not v for a, (k, v) in zip(attns, self._native[0])
        ):  # first use, or the caches were bound anew: the stack's pointers are stale
            self._native = ([(a.k_cache, a.v_cache) for a in attns], self._make_native_stack())
        return self._native[1]

    def _make_native_stack(self) -> cpu_native.DecoderStack | None:
        first = self.layers[0]
        eps = first.input_layernorm.eps
        if tp().size != 1 or any(
            layer.input_layernorm.eps != eps or layer.post_attention_layernorm.eps != eps for layer in self.layers
        ):
            return None
        weights = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(lin.int4 is None or lin.int4.native is None or lin.bias is not None for lin in linears):
                return None
            q_norm, k_norm = attn.attn.q_norm, attn.attn.k_norm
            weights.append(cpu_native.LayerWeights(
                layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data,
                None if q_norm is None else q_norm.weight.data, None if k_norm is None else k_norm.weight.data,
                *(lin.int4.native for lin in linears), attn.attn.k_cache, attn.attn.v_cache,
            ))
        a = first.self_attn.attn
        qk_eps = a.q_norm.eps if a.q_norm is not None else 0.0
        return cpu_native.DecoderStack.make(weights, a.num_heads, a.num_kv_heads, a.head_dim, eps, qk_eps, a.scale)


class LlamaForCausalLM(CausalLM):
    config_class = LlamaConfig
    stacked_params = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }
    moved_modules = {"attn.q_norm": "q_norm", "attn.k_norm": "k_norm"}

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # Tied: the output projection is the embedding matrix itself, so no second parameter.
        self.lm_head = (
            None if config.tie_word_embeddings else ParallelLMHead(config.hidden_size, config.vocab_size)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def output_layer(self) -> VocabParallelEmbedding:
        return self.model.embed_tokens if self.lm_head is None else self.lm_head
