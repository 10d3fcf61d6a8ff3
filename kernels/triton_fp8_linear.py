"""`quantize_rows_ref` (kernels/fp8_linear.py) in one Triton kernel: each program quantizes one
row of x to e4m3, finding its amax first (dynamic per-token scales) or reading the static
per-tensor scale, and writes the row's fp32 scale beside it ([M, 1], `_scaled_mm`'s scale_a).

The divisions are IEEE (`div_rn`; Triton's `/` is an approximate division) and the cast to
e4m3 rounds to nearest even, as PyTorch's does, so the output equals the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_linear import FP8_DTYPE, FP8_MAX, MIN_SCALE

MAX_BLOCK = 4096


@triton.jit(do_not_specialize=["scale_ub"])
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, static_scale_ptr, K, stride_x, stride_q, scale_ub,
    STATIC: tl.constexpr, HAS_UB: tl.constexpr, BLOCK: tl.constexpr,
    FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            k = start + offs
            x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        row_amax = tl.max(amax, axis=0)
        if HAS_UB:
            row_amax = tl.minimum(row_amax, scale_ub)
        scale = tl.maximum(tl.math.div_rn(row_amax, FP8_MAX_), MIN_SCALE_)
    tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK):
        k = start + offs
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.math.div_rn(x, tl.zeros([BLOCK], dtype=tl.float32) + scale)
        q = tl.minimum(tl.maximum(q, -FP8_MAX_), FP8_MAX_)
        tl.store(q_row + k, q.to(q_ptr.dtype.element_ty), mask=k < K)


def block_and_warps(k: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(k), MAX_BLOCK)
    return block, 8 if block >= 4096 else 4 if block >= 1024 else 2


def quantize_rows_triton(
    x: torch.Tensor, static_scale: torch.Tensor | None = None, scale_ub: float | None = None,
    out_dtype: torch.dtype = FP8_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows contiguous) -> (e4m3 [M, K], fp32 scales [M, 1]). out_dtype float32: the
    values just before the cast to e4m3 (tests: Triton's CPU interpreter casts to e4m3 wrongly)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=out_dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if static_scale is not None:
        static_scale = static_scale.to(torch.float32)
    block, warps = block_and_warps(k)
    _quantize_rows_kernel[(m,)](
        x, q, scale, static_scale if static_scale is not None else scale, k, x.stride(0), q.stride(0),
        float(scale_ub) if scale_ub is not None else 0.0,
        STATIC=static_scale is not None, HAS_UB=scale_ub is not None, BLOCK=block,
        FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE, num_warps=warps,
    )
    return q, scale
