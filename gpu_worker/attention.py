"""The paged attention layer and the per-step metadata it reads.

The model runner builds one `AttentionMetadata` per step and binds each layer's slice of the
KV pool once; a family's attention only hands this layer its fused QKV projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.layers import RMSNorm
from kernels import native_decode_attention, paged_attention, rope_write_kv, write_kv
from kernels.paged_attention import decode_attention, decode_context
from kernels.qkv import split_qkv


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the batch and in the cache (B sequences, T tokens)."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token's K/V
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: context length including this step's tokens
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b owns tokens [qsl[b], qsl[b+1])
    # Optional host-side hints for the GPU kernel: a bound on seq_lens (splits long contexts
    # less when they are short), and how many leading sequences are decodes (one query each;
    # the kernel then gives them decode tiles and the rest prefill tiles).
    max_seq_len: int | None = None
    num_decodes: int = 0
    # Off the GPU, a step of decodes only: the context slots every layer reads, found by the
    # first layer (a metadata object reused across steps must reset it to None each step).
    decode_context: tuple[torch.Tensor, torch.Tensor | None] | None = None


class Attention(nn.Module):
    """Everything between a layer's QKV projection and its output projection.

    Takes the fused projection [T, (heads + 2 kv_heads) d], stores this step's K/V at their
    cache slots, attends over each sequence's context and returns [T, heads d]. Given rotary
    cos/sin, it first rotates q and k, after RMS-normalizing each of their heads when
    `qk_norm_eps` is given (Qwen3); on the GPU that is one kernel with the K/V write.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        qk_norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        # Held here because the fused kernel applies them; the family maps the checkpoint's names.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        # Views into the runner's KV pool, bound after allocation: not parameters, not buffers.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # An fp8 cache's scales (--kv-cache-dtype fp8): K and V are stored as x / scale in e4m3.
        # Python floats, constants to the CUDA graphs; 1.0 as in vLLM when the checkpoint has none.
        # Other caches ignore them.
        self.k_scale = 1.0
        self.v_scale = 1.0
        # The model's dtype, which q keeps over an fp8 cache (bound with the cache; the kernel
        # warm-up builds its q in it).
        self.q_dtype: torch.dtype | None = None

    def forward(
        self,
        qkv: torch.Tensor,
        meta: AttentionMetadata,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """qkv [T, (heads + 2 kv_heads) d] -> [T, heads d]; cos_sin: two [T, d] tables, or None
        for a model without rotary embedding."""
        if cos_sin is None:
            q, k, v = split_qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
            write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, k_scale=self.k_scale, v_scale=self.v_scale)
        else:
            q = self._norm_rope_write_kv(qkv, *cos_sin, meta.slot_mapping)
        return self._attend(q, meta).flatten(1)

    def _norm_rope_write_kv(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor
    ) -> torch.Tensor:
        """q normed and rotated [T, heads, d]; k (normed, rotated) and v written to the cache."""
        if self.q_norm is None or self.k_norm is None:
            norms = (None, None, 0.0)
        else:
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        return rope_write_kv(
            qkv, self.num_heads, self.num_kv_heads, cos, sin, self.k_cache, self.v_cache, slot_mapping, *norms,
            k_scale=self.k_scale, v_scale=self.v_scale,
        )

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if not q.is_cuda and meta.num_decodes == len(meta.seq_lens):
            out = native_decode_attention(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, self.scale, meta.max_seq_len
            )
            if out is not None:
                return out
            if meta.decode_context is None:
                meta.decode_context = decode_context(meta.block_tables, meta.seq_lens, self.k_cache.shape[1])
            return decode_attention(
                q, self.k_cache, self.v_cache, meta.decode_context, self.scale, k_scale=self.k_scale,
                v_scale=self.v_scale,
            )
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
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
