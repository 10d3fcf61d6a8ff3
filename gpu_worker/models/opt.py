"""OPT (facebook/opt-*): LayerNorm, learned positions offset by 2, ReLU MLP, tied head.

Two variants beyond opt-125m's: opt-350m embeds in a smaller width (`word_embed_proj_dim`)
with `project_in`/`project_out` around the decoder, and normalizes after each residual
(post-LN, `do_layer_norm_before=False`), with no final norm.
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

# OPT's position table starts 2 rows in: fairseq reserved them for padding.
POSITION_OFFSET = 2


@dataclass
class OPTConfig(MultiHeadShape):
    vocab_size: int
    hidden_size: int
    word_embed_proj_dim: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    do_layer_norm_before: bool
    final_layer_norm: bool
    layer_norm_affine: bool
    enable_bias: bool
    activation: str
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict) -> OPTConfig:
        """From a Hugging Face config.json dict (`gpu_worker.model_config` checks it first)."""
        hidden = hf["hidden_size"]
        pre_ln = hf.get("do_layer_norm_before", True)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
            ffn_dim=hf["ffn_dim"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            do_layer_norm_before=pre_ln,
            final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
            layer_norm_affine=hf.get("layer_norm_elementwise_affine", True),
            enable_bias=hf.get("enable_bias", True),
            activation=hf.get("activation_function", "relu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        split = HeadSplit(heads, heads, config.head_dim)
        self.qkv_proj = MergedLinear(hidden, split.full_sizes, bias=config.enable_bias, shards=split.shards)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=config.enable_bias)
        self.attn = Attention(split.num_heads, split.num_kv_heads, config.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        return self.out_proj(self.attn(qkv, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.pre_ln = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_affine)
        self.fc1 = MergedLinear(hidden, [config.ffn_dim], bias=config.enable_bias)
        self.fc2 = RowParallelLinear(config.ffn_dim, hidden, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_affine)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.pre_ln:
            h = x + self.self_attn(self.self_attn_layer_norm(x), meta)
            return h + self.fc2(self.act(self.fc1(self.final_layer_norm(h))))
        h = self.self_attn_layer_norm(x + self.self_attn(x, meta))
        return self.final_layer_norm(h + self.fc2(self.act(self.fc1(h))))


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        hidden, embed = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = nn.Linear(embed, hidden, bias=False) if embed != hidden else None
        self.project_out = nn.Linear(hidden, embed, bias=False) if embed != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = (
            nn.LayerNorm(hidden, elementwise_affine=config.layer_norm_affine) if config.final_layer_norm else None
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            h = layer(h, meta)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h


class OPTModel(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(CausalLM):
    config_class = OPTConfig
    stacked_params = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = (
            None if config.tie_word_embeddings else ParallelLMHead(config.word_embed_proj_dim, config.vocab_size)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, meta)

    def output_layer(self) -> VocabParallelEmbedding:
        return self.model.decoder.embed_tokens if self.lm_head is None else self.lm_head
