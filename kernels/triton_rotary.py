"""Rotary embedding in Triton (`apply_rotary_ref`'s function): one program per token, all heads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (heads < NUM_HEADS) & (dims < HALF)
    # Both halves of the table are read, so any table the reference accepts gives its result.
    cos1 = tl.load(cos_ptr + token * stride_ct + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * stride_ct + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + token * stride_st + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * stride_st + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    x_row = x_ptr + token * stride_xt + heads * stride_xh
    x1 = tl.load(x_row + dims, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + dims, mask=ok, other=0.0).to(tl.float32)
    out_row = out_ptr + token * stride_ot + heads * stride_oh
    tl.store(out_row + dims, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_row + HALF + dims, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=ok)


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] (any token/head strides), cos and sin [T, head_dim] -> new [T, heads, head_dim]."""
    num_tokens, num_heads, head_dim = x.shape
    if head_dim % 2 or cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} do not fit x {tuple(x.shape)}")
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("the head dimension of x, cos and sin must be contiguous")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    half = head_dim // 2
    block_h, block_half = triton.next_power_of_2(num_heads), triton.next_power_of_2(half)
    _rotary_kernel[(num_tokens,)](
        x, cos, sin, out,
        x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=min(8, max(1, block_h * block_half // 512)),
    )
    return out
