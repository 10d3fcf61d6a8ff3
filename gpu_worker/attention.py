"""The paged attention layer and the per-step metadata it reads.

The model runner builds one `AttentionMetadata` per step and binds each layer's slice of the
KV pool once; a model's attention only hands this layer its new q, k and v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import paged_attention, write_kv


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the batch and in the cache (B sequences, T tokens)."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token's K/V
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: context length including this step's tokens
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b owns tokens [qsl[b], qsl[b+1])
    # Optional host-side hints for the GPU kernel (kernels issue): a bound on seq_lens (splits
    # long contexts less when they are short), and how many leading sequences are decodes
    # (one query each; the kernel then gives them decode tiles and the rest prefill tiles).
    max_seq_len: int | None = None
    num_decodes: int = 0


class Attention(nn.Module):
    """Store this step's K/V in the paged cache, then attend over each sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Views into the runner's KV pool, bound after allocation: not parameters, not buffers.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, heads, d], k and v [T, kv_heads, d] -> [T, heads, d]."""
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention alone, for a layer that already wrote this step's K/V (`rope_write_kv`)."""
        return paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            max_seq_len=meta.max_seq_len,
            num_decodes=meta.num_decodes,
        )
