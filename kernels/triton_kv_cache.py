"""Writing new keys and values into the paged KV cache, in Triton (`write_kv_ref`'s function).

An fp8 cache stores x * (1 / scale) saturated to +-448 and rounded to e4m3 (`quantize_fp8`'s
bytes); `to_e4m3` is that arithmetic, shared with the fused rope kernel (triton_qkv.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import FP8_MAX, is_fp8, keys_contiguous

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _round_e4m3(x):
    """fp32 x (within +-448) rounded to nearest even on e4m3's grid, still in fp32.

    For Triton's CPU interpreter only (3.9), whose fp32 -> fp8 cast rounds ties away from zero
    and drops the carry of a mantissa that rounds up into the exponent (1.98 -> 1.0): given a
    value already on the grid, its cast is exact. The GPU's cast rounds correctly by itself.
    """
    bits = x.to(tl.int32, bitcast=True)
    # Normal range (|x| >= 2^-6): keep 3 of the 23 mantissa bits, rounding to nearest even;
    # a carry out of the mantissa bumps the exponent, as it should.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # Subnormal range: multiples of 2^-9, rounded by an fp32 addition (ulp 2^-9 at 2^14).
    a = tl.abs(x)
    sub = (a + 16384.0) - 16384.0
    sub = tl.where(bits < 0, -sub, sub)
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def to_e4m3(x, inv_scale, EMULATE: tl.constexpr):
    """x * inv_scale in fp32, saturated to e4m3's +-448: what an fp8 cache stores, once cast
    (RTNE) to float8e4nv. EMULATE (CPU tensors: the interpreter) rounds it here first."""
    x = tl.clamp(x.to(tl.float32) * inv_scale, -_FP8_MAX, _FP8_MAX)
    if EMULATE:
        x = _round_e4m3(x)
    return x


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    k_inv_scale, v_inv_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, EMULATE: tl.constexpr,
):
    """One token: its K and V rows for every KV head, stored at its slot (FP8: quantized)."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return  # a padding token (CUDA graph batches are padded with slot -1, as in vLLM)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    ok = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=ok)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=ok)
    if FP8:
        k = to_e4m3(k, k_inv_scale, EMULATE)
        v = to_e4m3(v, v_inv_scale, EMULATE)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims * stride_vcd
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store token t's key and value at cache slot `slot_mapping[t]`, in place; slot -1 skips t.

    k, v: [T, num_kv_heads, head_dim], any token and head strides (views into a fused QKV
    output are fine); caches: [num_blocks, block_size, num_kv_heads, head_dim]. An fp8 cache
    stores k / k_scale and v / v_scale (the scales: Python floats, constants in a CUDA graph).
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} do not fit caches {tuple(k_cache.shape)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} is not one slot per token ({num_tokens})")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("the head dimension of k, v and the K cache must be contiguous")
    if v_cache.stride(-1) != 1 and not keys_contiguous(v_cache):
        raise ValueError("the V cache must be contiguous in its head dimension or in its slots")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"cache dtypes differ: k {k_cache.dtype}, v {v_cache.dtype}")
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        1.0 / k_scale, 1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], FP8=is_fp8(k_cache), EMULATE=k.device.type == "cpu",
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
