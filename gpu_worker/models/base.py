"""What every model family shares: the runner's interface and loading Hugging Face-named weights.

A family's module keeps Hugging Face's parameter names, with two exceptions: projections of
one input are stacked into a `MergedLinear` (q/k/v, gate/up), so a layer does two matmuls where
it would do five; and Qwen3's q/k norms live in the `Attention` layer, whose fused kernel
applies them. The class says which checkpoint names feed which stacked rows or moved modules,
which names it skips, and which weights are stored transposed (GPT-2's Conv1D); `load_weights`
does the rest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from gpu_worker.attention import Attention, AttentionMetadata
from gpu_worker.gguf_quant import GGUFQuantized
from gpu_worker.layers import MergedLinear, VocabParallelEmbedding, check_shape
from gpu_worker.parallel import all_gather_last_dim, tp
from gpu_worker.weight_source import WeightSource


class ModelConfig(Protocol):
    """What the runner reads from every family's config to size the KV cache."""

    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict) -> Any: ...


class MultiHeadShape:
    """Head layout of a config without grouped-query attention (every head has its own K/V)."""

    hidden_size: int
    num_attention_heads: int

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class CausalLM(nn.Module):
    config_class: ClassVar[type[ModelConfig]]
    # The base model's prefix in full checkpoints; checkpoints of the base model alone (the
    # hub's gpt2 and opt-125m) leave it out, and it is added back.
    base_prefix: ClassVar[str] = "model."
    # Our stacked parameter -> the Hugging Face projections it holds, in row order.
    stacked_params: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Our module -> the Hugging Face module whose weights it holds under another path.
    moved_modules: ClassVar[dict[str, str]] = {}
    # Checkpoint names ending so are buffers we compute ourselves (rope tables, causal masks).
    ignored_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    # Weights stored [in, out] (Conv1D) rather than nn.Linear's [out, in].
    transposed_suffixes: ClassVar[tuple[str, ...]] = ()

    config: Any

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Token ids and positions [T] of a flattened batch -> final hidden states [T, hidden]."""
        raise NotImplementedError

    def output_layer(self) -> VocabParallelEmbedding:
        """The layer whose [vocab, hidden] matrix turns final hidden states into logits (the
        embedding itself when tied)."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [N, hidden] of the positions that sample -> logits [N, vocab] in the
        model's dtype (the sampler casts to fp32 only what needs more than an argmax). Under
        tensor parallelism each rank computes its vocabulary slice and every rank gets all of
        them, so every rank samples the same tokens."""
        logits = self.output_layer().logits(hidden)
        if tp().size == 1:
            return logits
        return all_gather_last_dim(logits)[:, : self.config.vocab_size]

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | WeightSource]]) -> None:
        """Copy Hugging Face-named tensors into the parameters (stacking, transposing as declared),
        each rank reading only its slice of a tensor-parallel layer's weights.

        Raises ValueError on an unknown name, a wrong shape or a parameter left unloaded, so
        a checkpoint that does not fit never runs as garbage or uninitialized memory.
        """
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: dict[str, set[int]] = defaultdict(set)
        for name, tensor in weights:
            if name.endswith(self.ignored_suffixes):
                continue
            if self.config.tie_word_embeddings and name == "lm_head.weight":
                continue  # the same tensor as the embedding
            target, shard = self._our_name(name)
            if target not in params and self.base_prefix + target in params:
                target = self.base_prefix + target
            if target not in params:
                raise ValueError(f"unexpected weight {name} (a variant this model does not support?)")
            module_name, _, param_name = target.rpartition(".")
            module = modules[module_name]
            if isinstance(tensor, GGUFQuantized):
                src = tensor
            else:
                src = tensor if isinstance(tensor, WeightSource) else WeightSource(tensor)
                if name.endswith(self.transposed_suffixes):
                    src = src.t()
            try:
                if isinstance(src, GGUFQuantized):  # kept in its blocks (GGUF on the CPU)
                    if not hasattr(module, "load_quantized"):
                        raise ValueError("is quantized, which this layer does not take")
                    module.load_quantized(param_name, src, shard)
                elif hasattr(module, "load_param"):  # a tensor-parallel layer reads its slice
                    module.load_param(param_name, src, shard)
                else:
                    check_shape(src, tuple(params[target].shape), param_name)
                    params[target].data.copy_(src.full())
            except ValueError as e:
                raise ValueError(f"weight {name} {e}") from None
            if shard is None and isinstance(module, MergedLinear):
                loaded[target].update(range(len(module.output_sizes)))  # stacked in one tensor
            else:
                loaded[target].add(shard or 0)
        missing = [name for name in params if len(loaded[name]) < self._num_shards(name, modules)]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}")
        self.output_layer().prepare_logits()

    def _our_module(self, name: str, modules: dict[str, nn.Module]) -> tuple[str, int | None]:
        """The name of our module that takes checkpoint tensor `name`, and its row block."""
        target, part = self._our_name(name)
        module_name = target.rpartition(".")[0]
        if module_name not in modules and self.base_prefix + module_name in modules:
            module_name = self.base_prefix + module_name
        return module_name, part

    def _our_name(self, name: str) -> tuple[str, int | None]:
        """Our parameter for checkpoint tensor `name`, and its row block if it is stacked."""
        for ours, hf_key in self.moved_modules.items():
            name = name.replace(f".{hf_key}.", f".{ours}.")
        for ours, parts in self.stacked_params.items():
            for shard, hf_key in enumerate(parts):
                if f".{hf_key}." in name:
                    return name.replace(f".{hf_key}.", f".{ours}."), shard
        return name, None

    @staticmethod
    def _num_shards(name: str, modules: dict[str, nn.Module]) -> int:
        module = modules[name.rpartition(".")[0]]
        return len(module.output_sizes) if isinstance(module, MergedLinear) else 1
