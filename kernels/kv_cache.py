"""Writing new keys and values into the paged KV cache."""

from __future__ import annotations

import torch


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store token t's key and value at cache slot `slot_mapping[t]`, in place.

    k, v: [T, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim]; slot_mapping: [T] int, slot = block_id * block_size + offset in the block; a
    negative slot marks a padding token, whose K/V are dropped (as the Triton kernel does).
    """
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    num_blocks, block_size = k_cache.shape[:2]
    # A flat view makes a slot a plain row index: one scatter per tensor, no per-token loop.
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)
