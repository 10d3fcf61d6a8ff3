"""GPT-2 (gpt2, distilgpt2, DialoGPT): LayerNorm, learned positions, GELU MLP, tied head.

Hugging Face stores GPT-2's projections as Conv1D, [in, out]; they are transposed on load
into ordinary linears. c_attn already holds q, k and v stacked, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.attention import Attention, AttentionMetadata
from gpu_worker.layers import (
    ACTIVATIONS,
    HeadSplit,
    MergedLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from gpu_worker.models.base import CausalLM, MultiHeadShape


@dataclass
class GPT2Config(MultiHeadShape):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    activation: str
    scale_attn_by_inverse_layer_idx: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict) -> GPT2Config:
        """From a Hugging Face config.json dict (`gpu_worker.model_config` checks it first)."""
        hidden = hf["n_embd"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            num_hidden_layers=hf["n_layer"],
            num_attention_heads=hf["n_head"],
            max_position_embeddings=hf.get("n_positions", 1024),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=hf.get("activation_function", "gelu_new"),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.head_dim
        split = HeadSplit(heads, heads, head_dim)
        # q, k and v stacked in one checkpoint tensor: each rank reads its heads of each.
        self.c_attn = MergedLinear(config.hidden_size, split.full_sizes, bias=True, shards=split.shards)
        self.c_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True)
        scale = head_dim**-0.5
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.attn = Attention(split.num_heads, split.num_kv_heads, head_dim, scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.c_attn(x)
        return self.c_proj(self.attn(qkv, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = MergedLinear(config.hidden_size, [config.intermediate_size], bias=True)
        self.c_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = x + self.attn(self.ln_1(x), meta)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            h = block(h, meta)
        return self.ln_f(h)


class GPT2LMHeadModel(CausalLM):
    config_class = GPT2Config
    base_prefix = "transformer."
    # attn.bias / attn.masked_bias: the causal mask buffers older checkpoints saved.
    ignored_suffixes = (".attn.bias", ".attn.masked_bias")
    transposed_suffixes = ("c_attn.weight", "c_proj.weight", "c_fc.weight")

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = (
            None if config.tie_word_embeddings else ParallelLMHead(config.hidden_size, config.vocab_size)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def output_layer(self) -> VocabParallelEmbedding:
        return self.transformer.wte if self.lm_head is None else self.lm_head
