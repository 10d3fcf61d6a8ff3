"""From a fused QKV projection to attention's inputs: q ready to attend, K/V in the paged cache.

What every rotary decoder layer does between its QKV matmul and attention, in one call: split
q, k and v; RMSNorm over each head of q and k (Qwen3, optional); rotary embedding of q and k;
k and v stored at their tokens' cache slots. On the GPU it is one kernel instead of seven
(two norms, two copies making q and k contiguous for them, two rotaries, the K/V write).
"""

from __future__ import annotations

import torch

from kernels.kv_cache import write_kv_ref
from kernels.norm import rms_norm_ref
from kernels.rotary import apply_rotary_ref


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Views q [T, heads, d], k and v [T, kv_heads, d] of a fused [T, (heads + 2 kv_heads) d] output."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != q_size + 2 * kv_size:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not [T, {q_size + 2 * kv_size}]")
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)


def rope_write_kv_ref(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q after its norm and rotary ([T, heads, d]); k (normed, rotated) and v written to the
    caches at slot_mapping (slot -1: padding, not written). cos, sin: [T, d] (neox halves);
    the norm weights: [d], both or neither. An fp8 cache stores k / k_scale and v / v_scale."""
    head_dim = k_cache.shape[-1]
    q, k, v = split_qkv(qkv, num_heads, num_kv_heads, head_dim)
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q and k are normed both or neither")
    if q_norm_weight is not None and k_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
        q, k = apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)
    else:  # q and k side by side in qkv: rotated in one call
        qk = apply_rotary_ref(qkv[:, : (num_heads + num_kv_heads) * head_dim].unflatten(1, (-1, head_dim)), cos, sin)
        q, k = qk[:, :num_heads], qk[:, num_heads:]
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    return q
