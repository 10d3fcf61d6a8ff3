"""`rope_write_kv_ref` in one Triton kernel: a program per token reads its row of the fused QKV
output once and writes q (normed, rotated) and the cache slots of k and v.

The arithmetic is the separate kernels' (`triton_norm`, `triton_rotary`): the per-head norm in
fp32, rounded to the activation dtype before and after its weight, rotary in fp32 on those
rounded values, so the result matches what the unfused kernels computed. An fp8 cache gets
k (so rounded) and v quantized as `write_kv_triton` quantizes them (`to_e4m3`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import is_fp8, keys_contiguous
from kernels.pdl import pdl_kwargs, pdl_trigger, pdl_wait
from kernels.triton_kv_cache import to_e4m3


@triton.jit
def _norm_rope(x1, x2, w_ptr, cos1, cos2, sin1, sin2, eps, dims, dim_ok,
               HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr, DTYPE: tl.constexpr):
    """The two halves of some heads ([heads, half], fp32) -> normed (optional), rotated halves."""
    if NORM:
        inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)
        w1 = tl.load(w_ptr + dims, mask=dim_ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + dims, mask=dim_ok, other=0.0).to(tl.float32)
        x1 = ((x1 * inv_rms[:, None]).to(DTYPE).to(tl.float32) * w1).to(DTYPE).to(tl.float32)
        x2 = ((x2 * inv_rms[:, None]).to(DTYPE).to(tl.float32) * w2).to(DTYPE).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    q_norm_ptr, k_norm_ptr, eps,
    stride_t, stride_ct, stride_st, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    k_inv_scale, v_inv_scale,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NORM: tl.constexpr, FP8: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    token = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_ok = dims < HALF
    # Before the wait: cos/sin (gathered by PyTorch at the forward's start) and the slot (a step
    # input), which no kernel with PDL writes (kernels/pdl.py).
    cos1 = tl.load(cos_ptr + token * stride_ct + dims, mask=dim_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * stride_ct + HALF + dims, mask=dim_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * stride_st + dims, mask=dim_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * stride_st + HALF + dims, mask=dim_ok, other=0.0).to(tl.float32)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    pdl_wait(PDL)
    row = qkv_ptr + token * stride_t

    # Every load of the row issued at once, q's and k's and v's: one wait on memory, not three.
    heads = tl.arange(0, BLOCK_H)[:, None]
    ok = (heads < NUM_HEADS) & dim_ok
    src = row + heads * HEAD_DIM + dims
    q1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    q2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    kv_heads = tl.arange(0, BLOCK_KV)[:, None]
    kv_ok = (kv_heads < NUM_KV_HEADS) & dim_ok
    k_src = row + (NUM_HEADS + kv_heads) * HEAD_DIM + dims
    k1 = tl.load(k_src, mask=kv_ok, other=0.0).to(tl.float32)
    k2 = tl.load(k_src + HALF, mask=kv_ok, other=0.0).to(tl.float32)
    v_src = row + (NUM_HEADS + NUM_KV_HEADS + kv_heads) * HEAD_DIM + dims
    v1 = tl.load(v_src, mask=kv_ok)
    v2 = tl.load(v_src + HALF, mask=kv_ok)

    # q: every query head of this token, to q_out.
    q1, q2 = _norm_rope(q1, q2, q_norm_ptr, cos1, cos2, sin1, sin2, eps, dims, dim_ok, HEAD_DIM, HALF, NORM, dtype)
    dst = q_out_ptr + token * stride_qt + heads * stride_qh + dims
    tl.store(dst, q1.to(dtype), mask=ok)
    tl.store(dst + HALF, q2.to(dtype), mask=ok)

    # k (normed, rotated, rounded as the q output and the reference's k are) and v, quantized
    # for an fp8 cache; stored at the cache slot, unless the token is padding (slot -1).
    k1, k2 = _norm_rope(k1, k2, k_norm_ptr, cos1, cos2, sin1, sin2, eps, dims, dim_ok, HEAD_DIM, HALF, NORM, dtype)
    k1, k2 = k1.to(dtype), k2.to(dtype)
    if FP8:
        k1, k2 = to_e4m3(k1, k_inv_scale, EMULATE), to_e4m3(k2, k_inv_scale, EMULATE)
        v1, v2 = to_e4m3(v1, v_inv_scale, EMULATE), to_e4m3(v2, v_inv_scale, EMULATE)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + kv_heads * stride_kch + dims
        k_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_dst, k1.to(k_dtype), mask=kv_ok)
        tl.store(k_dst + HALF, k2.to(k_dtype), mask=kv_ok)
        # stride_vcd: 1, or the block size where V is `keys_contiguous`
        v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + kv_heads * stride_vch + dims * stride_vcd
        v_dtype = v_cache_ptr.dtype.element_ty
        tl.store(v_dst, v1.to(v_dtype), mask=kv_ok)
        tl.store(v_dst + HALF * stride_vcd, v2.to(v_dtype), mask=kv_ok)


def rope_write_kv_triton(
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
    """`rope_write_kv_ref`'s function; an fp8 cache stores k / k_scale and v / v_scale."""
    num_tokens = qkv.shape[0]
    num_blocks, block_size, cache_kv_heads, head_dim = k_cache.shape
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not [T, {width}] with contiguous rows")
    if v_cache.shape != k_cache.shape or cache_kv_heads != num_kv_heads or head_dim % 2:
        raise ValueError(f"caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit {num_kv_heads} "
                         f"kv heads of an even head dim")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"cache dtypes differ: k {k_cache.dtype}, v {v_cache.dtype}")
    if cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError(f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} are not [{num_tokens}, {head_dim}]")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} is not one slot per token ({num_tokens})")
    if k_cache.stride(-1) != 1 or (v_cache.stride(-1) != 1 and not keys_contiguous(v_cache)):
        raise ValueError("the head dimension of the K cache must be contiguous, and of the V cache or its slots")
    norm = q_norm_weight is not None
    if norm != (k_norm_weight is not None):
        raise ValueError("q and k are normed both or neither")
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    half = head_dim // 2
    block_h = triton.next_power_of_2(num_heads)
    _rope_write_kv_kernel[(num_tokens,)](
        qkv, cos, sin, q, k_cache, v_cache, slot_mapping,
        q_norm_weight if norm else qkv, k_norm_weight if norm else qkv, eps,
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        1.0 / k_scale, 1.0 / v_scale,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_H=block_h, BLOCK_KV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_SIZE=block_size, NORM=norm,
        FP8=is_fp8(k_cache), EMULATE=qkv.device.type == "cpu",
        num_warps=min(8, max(1, block_h * triton.next_power_of_2(half) // 512)), **pdl_kwargs(qkv.device),
    )
    return q
