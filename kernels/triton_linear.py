"""`linear_ref` for few rows (decode steps of up to 16 sequences) in Triton.

At one to sixteen rows a projection is a weight read: every program streams a slice of
BLOCK_N weight rows (contiguous along `in`) once, multiplies it with all of x (a few KB, from
L2) on the tensor cores (rows padded to 16, masked rows never loaded) and writes its
BLOCK_N outputs. No split of `in`: the widest projections of the benchmark models (4,096 ->
28,672, 14,336 -> 4,096) give 128 or more programs, enough to keep every SM streaming without
the extra reduction launch cuBLAS's split-K kernels add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_begin, pdl_kwargs
from kernels.triton_paged_attention import H100, device_limits

MAX_ROWS = 16


@dataclass(frozen=True)
class LinearConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# M (1..16 rows) is not specialized: one compiled variant serves every batch size, so the eager
# lm_head of a step whose batch differs from the captured graph sizes never compiles mid-serving.
@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        # Without a mask along k (EVEN_K) Triton pipelines the loop (cp.async into shared memory,
        # num_stages deep); with one it does not, and each tile's load latency shows.
        k_ok = k < K if not EVEN_K else tl.full([BLOCK_K], 1, tl.int1)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies bf16 into garbage: widen the rounded operands
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# Shared memory Triton's pipeliner may fill: (num_stages - 1) buffers of each loaded tile, with
# what layout conversions need kept free on top of them (Hopper: 200 of the 227 KB a block may
# opt in to; less on GPUs with less).
_SHARED_MEMORY_HEADROOM = 27 * 1024
SHARED_MEMORY_BUDGET = H100.shared_mem - _SHARED_MEMORY_HEADROOM


def default_config(n: int, k: int, shared_mem: int = H100.shared_mem) -> LinearConfig:
    """The tiling for `out` = n, `in` = k, from the sweep of `bench kernels --sweep --only gemm`
    (docs/BENCHMARKS.md): 32 outputs per program once there are 4,096 of them
    (128+ programs), else 16; 512-wide key tiles where few outputs meet a long `in` (each
    program streams long rows), else the widest key tile up to 256 that divides `in` (none: 64,
    masked); four stages, fewer where the tiles would not fit in the device's `shared_mem`."""
    block_n = 32 if n >= 4096 else 16
    if n <= 4096 and k >= 2048 and k % 512 == 0:
        block_k = 512
    else:
        block_k = next((b for b in (256, 128, 64, 32, 16) if k % b == 0), 64)
    per_stage = (MAX_ROWS + block_n) * block_k * 2
    num_stages = max(2, min(4, 1 + (shared_mem - _SHARED_MEMORY_HEADROOM) // per_stage))
    return LinearConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=num_stages)


def linear_skinny_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: LinearConfig | None = None
) -> torch.Tensor:
    """`linear_ref` for x [..., in] of at most MAX_ROWS rows in all."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"linear_skinny_triton takes at most {MAX_ROWS} rows, got {m}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError("the weight's rows must be contiguous ([out, in] as nn.Linear keeps it)")
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    out2 = out.view(m, n)
    cfg = config or default_config(n, k, device_limits(x.device).shared_mem)
    _skinny_linear_kernel[(triton.cdiv(n, cfg.block_n),)](
        x2, weight, bias if bias is not None else weight, out2, m, n, k, x2.stride(0), weight.stride(0),
        out2.stride(0), HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=x.device.type == "cpu" and x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(x.device),
    )
    return out
