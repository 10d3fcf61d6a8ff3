"""FP8 linears in Triton.

`quantize_rows_triton`: `quantize_rows_ref` (kernels/fp8_linear.py) in one kernel: each program
quantizes one row of x to e4m3, finding its amax first (dynamic per-token scales) or reading the
static per-tensor scale, and writes the row's fp32 scale beside it ([M, 1], `_scaled_mm`'s
scale_a). The divisions are IEEE (`div_rn`; Triton's `/` is an approximate division) and the cast
to e4m3 rounds to nearest even, as PyTorch's does, so the output equals the reference bit for bit.

`fp8_linear_skinny_triton`: W8A16 for decode-sized inputs (at most 16 rows), `w8a16_linear_ref`:
x (bf16/fp16, not quantized) times the e4m3 weight [N, K] widened in registers (e4m3 -> bf16/fp16
is exact), summed in fp32 on the tensor cores, each output column scaled by its weight row's
fp32 scale once at the end, the bias added, rounded once to x's dtype. The tiling is
kernels/triton_linear.py's skinny kernel (BLOCK_N weight rows streamed once per program, x's
rows padded to 16, no split of `in`): at batch 1 a projection is a weight read, and e4m3 halves
it; one launch, where the W8A8 path needs two (quantize x, `_scaled_mm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fp8_linear import FP8_DTYPE, FP8_MAX, MIN_SCALE
from kernels.pdl import pdl_begin, pdl_kwargs, pdl_trigger, pdl_wait
from kernels.triton_linear import _SHARED_MEMORY_HEADROOM, MAX_ROWS, LinearConfig
from kernels.triton_linear import default_config as _bf16_default_config
from kernels.triton_paged_attention import H100, device_limits

MAX_BLOCK = 4096


@triton.jit(do_not_specialize=["scale_ub"])
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, static_scale_ptr, K, stride_x, stride_q, scale_ub,
    STATIC: tl.constexpr, HAS_UB: tl.constexpr, BLOCK: tl.constexpr,
    FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
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
        FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE, num_warps=warps, **pdl_kwargs(x.device),
    )
    return q, scale


# ---- W8A16 for at most MAX_ROWS rows ------------------------------------------------------------


# M (1..16 rows) is not specialized, as in kernels/triton_linear.py: one compiled variant per shape.
@triton.jit(do_not_specialize=["M"])
def _skinny_fp8_linear_kernel(
    x_ptr, w_ptr, w_scale_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
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
        # Unmasked along k (EVEN_K), Triton pipelines the loop (see kernels/triton_linear.py).
        k_ok = k < K if not EVEN_K else tl.full([BLOCK_K], 1, tl.int1)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter: both operands in fp32 (e4m3 -> fp32 is exact), an IEEE dot
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:  # e4m3 -> bf16/fp16 is exact (3 mantissa bits; 2^-9 .. 448 fits both)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    acc = acc * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# One row (batch-1 decode): no tensor cores. Each program streams BLOCK_N weight rows, widens
# e4m3 to fp32 and multiply-adds into a [BLOCK_N, BLOCK_K] fp32 tile, summed across `in` once at
# the end. On an H200 this beat the tensor-core kernel below at every llama3-8b projection (7.6
# against 11.8 us on 4096 x 4096; docs/BENCHMARKS.md). Under PDL (kernels/pdl.py) the first
# tile's weights are requested before waiting for the kernel that writes x.
@triton.jit
def _gemv_w_tile(w_rows, k, col_ok, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_rows + k[None, :], mask=col_ok[:, None], other=0.0)
    return tl.load(w_rows + k[None, :], mask=col_ok[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _gemv_x_tile(x_ptr, k, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(x_ptr + k).to(tl.float32)
    return tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _gemv_fp8_kernel(
    x_ptr, w_ptr, w_scale_ptr, b_ptr, out_ptr, N, K, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UNROLL: tl.constexpr, PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    if PDL:  # the first tile peeled: its weights loaded before the wait
        w = _gemv_w_tile(w_rows, ks, col_ok, K, EVEN_K)
        pdl_wait(PDL)
        acc = w.to(tl.float32) * _gemv_x_tile(x_ptr, ks, K, EVEN_K)[None, :]
        start = BLOCK_K
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        start = 0
    if UNROLL == 2:  # two tiles' loads issued before either is used (the second masked past K)
        for k0 in range(start, K, 2 * BLOCK_K):
            ka = k0 + ks
            kb = ka + BLOCK_K
            wa = _gemv_w_tile(w_rows, ka, col_ok, K, EVEN_K)
            wb = _gemv_w_tile(w_rows, kb, col_ok, K, False)
            xa = _gemv_x_tile(x_ptr, ka, K, EVEN_K)
            xb = _gemv_x_tile(x_ptr, kb, K, False)
            acc += wa.to(tl.float32) * xa[None, :]
            acc += wb.to(tl.float32) * xb[None, :]
    else:
        for k0 in range(start, K, BLOCK_K):
            k = k0 + ks
            w = _gemv_w_tile(w_rows, k, col_ok, K, EVEN_K)
            acc += w.to(tl.float32) * _gemv_x_tile(x_ptr, k, K, EVEN_K)[None, :]
    out = tl.sum(acc, axis=1) * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemv_fp8_vec_kernel(
    x_ptr, w_ptr, w_scale_ptr, b_ptr, out_ptr, N, K, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    VEC: tl.constexpr, PDL: tl.constexpr,
):
    """`_gemv_fp8_kernel` with the key tile seen as [BLOCK_K / VEC, VEC]: the VEC products of
    consecutive keys (one thread's 16-byte load) are summed in the thread every step, so the
    running sum is [BLOCK_N, BLOCK_K / VEC] (a VEC-th of the registers): more programs fit an SM,
    more loads in flight (the 2D kernel stalls on its loads, ncu: long scoreboard)."""
    pdl_trigger(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kk = tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    w_rows = w_ptr + cols.to(tl.int64)[:, None, None] * stride_wn
    ok3 = col_ok[:, None, None]
    acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        if EVEN_K:
            w = tl.load(w_rows + k[None, :, :], mask=ok3, other=0.0)
        else:
            w = tl.load(w_rows + k[None, :, :], mask=ok3 & (k < K)[None, :, :], other=0.0)
        if k0 == 0:
            pdl_wait(PDL)  # x is written by the kernel before; the weights are constants
        if EVEN_K:
            x = tl.load(x_ptr + k).to(tl.float32)
        else:
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :, :], axis=2)
    out = tl.sum(acc, axis=1) * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@dataclass(frozen=True)
class GemvConfig:
    """The one-row kernel's tiling: weight rows and keys a program holds, warps, and how many
    key tiles each loop step loads before using them (1 or 2)."""

    block_n: int
    block_k: int
    num_warps: int
    unroll: int = 1
    vec: int = 0  # > 0: `_gemv_fp8_vec_kernel`, VEC keys summed in the thread each step (unroll ignored)


def gemv_fp8_config(n: int, k: int) -> GemvConfig:
    """The one-row kernel's tiling, from H200 sweeps at llama3-8b's projections (`pagoda bench
    kernels --only fp8_gemv --sweep`, docs/BENCHMARKS.md): 4 rows x 1,024 keys a program, 4
    warps, where `out` <= `in` (o 4096 -> 4096, down 14336 -> 4096: best of 52 tilings and of 21
    `vec` ones at each); where `out` > `in` (more programs, each with fewer keys) 512 keys and 2
    warps, two key tiles loaded per loop step (qkv 4096 -> 6144: 9.5 -> 8.4 us); where `out` >
    2 x `in` (gate_up 4096 -> 28672) the `vec` kernel, 2 rows x 1,024 keys (34.9 -> 32.4 us).
    `in` below the key tile takes one tile."""
    if n > 2 * k:
        return GemvConfig(block_n=2, block_k=min(1024, triton.next_power_of_2(k)), num_warps=2, vec=16)
    if n > k:
        return GemvConfig(block_n=4, block_k=min(512, triton.next_power_of_2(k)), num_warps=2, unroll=2)
    return GemvConfig(block_n=4, block_k=min(1024, triton.next_power_of_2(k)), num_warps=4)


def skinny_fp8_config(n: int, k: int, shared_mem: int = H100.shared_mem) -> LinearConfig:
    """kernels/triton_linear.py's tiling for the same shape (`default_config`), its key tile
    doubled where `in` allows it (up to 1,024): a program then streams as many weight bytes per
    tile as the bf16 kernel does. Stages: as many as fit (2..4), the x tile in 16 bits and the
    weight tile in 8. Not swept on a GPU yet (`bench kernels --sweep` covers the bf16 kernel)."""
    base = _bf16_default_config(n, k, shared_mem)
    block_k = base.block_k * 2 if k % (base.block_k * 2) == 0 and base.block_k * 2 <= 1024 else base.block_k
    per_stage = (MAX_ROWS * 2 + base.block_n) * block_k
    num_stages = max(2, min(4, 1 + (shared_mem - _SHARED_MEMORY_HEADROOM) // per_stage))
    return LinearConfig(block_n=base.block_n, block_k=block_k, num_warps=base.num_warps, num_stages=num_stages)


def fp8_linear_skinny_triton(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
    config: LinearConfig | GemvConfig | None = None,
) -> torch.Tensor:
    """`w8a16_linear_ref` (kernels/fp8_linear.py) for x [..., K] (bf16/fp16) of at most MAX_ROWS
    rows in all: w_fp8 [N, K] e4m3 with rows contiguous, w_scale N fp32 values ([N] or [1, N])."""
    n, k = w_fp8.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fp8_linear_skinny_triton takes at most {MAX_ROWS} rows, got {m}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_linear_skinny_triton takes bf16 or fp16 activations, not {x.dtype}")
    if w_fp8.dtype != FP8_DTYPE or w_fp8.stride(-1) != 1:
        raise ValueError("the weight must be float8_e4m3fn with contiguous rows ([out, in])")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    scale = w_scale.reshape(-1)
    if scale.dtype != torch.float32 or scale.stride(0) != 1:
        scale = scale.float().contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    out2 = out.view(m, n)
    if m == 1 and (config is None or isinstance(config, GemvConfig)):
        _launch_gemv(x2, w_fp8, scale, bias, out2, config)
        return out
    if isinstance(config, GemvConfig):
        raise ValueError(f"a GemvConfig is for one row, not {m}")
    cfg = config or skinny_fp8_config(n, k, device_limits(x.device).shared_mem)
    _skinny_fp8_linear_kernel[(triton.cdiv(n, cfg.block_n),)](
        x2, w_fp8, scale, bias if bias is not None else scale, out2, m, n, k, x2.stride(0), w_fp8.stride(0),
        out2.stride(0), HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, UPCAST=x.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(x.device),
    )
    return out


def _launch_gemv(x2: torch.Tensor, w_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 out2: torch.Tensor, config: GemvConfig | None = None) -> None:
    n, k = w_fp8.shape
    cfg = config or gemv_fp8_config(n, k)
    if cfg.vec:
        _gemv_fp8_vec_kernel[(triton.cdiv(n, cfg.block_n),)](
            x2, w_fp8, scale, bias if bias is not None else scale, out2, n, k, w_fp8.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
            VEC=cfg.vec, num_warps=cfg.num_warps, **pdl_kwargs(x2.device),
        )
        return
    _gemv_fp8_kernel[(triton.cdiv(n, cfg.block_n),)](
        x2, w_fp8, scale, bias if bias is not None else scale, out2, n, k, w_fp8.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        UNROLL=cfg.unroll, num_warps=cfg.num_warps, **pdl_kwargs(x2.device),
    )
