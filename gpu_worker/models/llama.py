"""Llama (1/2/3, SmolLM2, Mistral without sliding window) in plain PyTorch.

It runs on a flattened batch: the tokens of many sequences laid end to end, each with its
position, and attention finds each sequence's context in the paged KV cache. Parameter names
follow Hugging Face's, except that q/k/v and gate/up are stacked into one matrix each so a
layer does two matmuls where it would do five.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.attention import Attention, AttentionMetadata
from gpu_worker.layers import RMSNorm, RotaryEmbedding, SiluAndMul


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

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a Hugging Face config.json dict (transformers 4 or 5 spelling of rope)."""
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        num_heads = hf["num_attention_heads"]
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
            rope_scaling=None if rope_type == "default" else rope,
        )


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = RotaryEmbedding.apply(q.view(-1, self.num_heads, self.head_dim), *cos_sin)
        k = RotaryEmbedding.apply(k.view(-1, self.num_kv_heads, self.head_dim), *cos_sin)
        o = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim), meta)
        return self.o_proj(o.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos_sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cos_sin = self.rotary_emb.cos_sin(positions)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos_sin, meta)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    config_class = LlamaConfig

    # Our stacked parameters and, in row order, the Hugging Face projections they hold.
    stacked_params = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # Tied: the output projection is the embedding matrix itself, so no second parameter.
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Token ids and positions [T] of a flattened batch -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, hidden] of the positions that sample -> logits [N, vocab] in fp32."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(hidden, weight).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the parameters, stacking q/k/v and gate/up.

        Raises ValueError on an unknown name, a wrong shape or a parameter left unloaded, so
        a checkpoint that does not fit never runs as garbage or uninitialized memory.
        """
        params = dict(self.named_parameters())
        loaded: dict[str, set[int]] = defaultdict(set)
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue  # older checkpoints saved the rope table; we compute our own
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # the same tensor as the embedding
            target, shard = self._stacked_target(name)
            if target not in params:
                raise ValueError(f"unexpected weight {name} (a variant this model does not support?)")
            rows = params[target].data
            if shard is not None:
                rows = self._shard_rows(rows, target)[shard]
            if rows.shape != tensor.shape:
                raise ValueError(f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(rows.shape)}")
            rows.copy_(tensor)
            loaded[target].add(shard or 0)
        missing = [name for name in params if len(loaded[name]) < self._num_shards(name)]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}")

    def _stacked_target(self, name: str) -> tuple[str, int | None]:
        for ours, parts in self.stacked_params.items():
            for shard, hf_key in enumerate(parts):
                if f".{hf_key}." in name:
                    return name.replace(hf_key, ours), shard
        return name, None

    def _num_shards(self, name: str) -> int:
        return next((len(p) for ours, p in self.stacked_params.items() if f".{ours}." in name), 1)

    def _shard_rows(self, weight: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
        """A stacked weight split into the row blocks of Hugging Face's projections."""
        if ".qkv_proj." in name:
            attn = self.model.layers[0].self_attn
            return weight.split([attn.q_size, attn.kv_size, attn.kv_size], dim=0)
        return weight.split([self.config.intermediate_size] * 2, dim=0)
