"""W4A16 linears in Triton: `w4a16_linear_ref` (kernels/int4_linear.py) on GPTQ's layout.

Both kernels read qweight int32 [K / 8, N] as stored and dequantize in registers: nibble j of
packed word [i, n] (input row k0 + 8i + j) shifted out and masked, the zero subtracted and the
scale multiplied in fp32. A tile's scales and zeros come one of three ways (GROUPS): one
[BLOCK_N] row for the whole key tile (no g_idx, the group size a multiple of BLOCK_K: group 128
under the prefill tiles' 64 or 128 keys), one per packed word (no g_idx, the group size a
multiple of 8: group 128 under the GEMV's 512 keys), or gathered per input row through g(k)
(act-order's g_idx, or odd group sizes).

- `_w4a16_gemv_kernel`, decode (the default up to GEMV_ROWS = 4 rows; it takes up to 16):
  no tensor cores. Each program owns BLOCK_N output columns, streams their packed weights
  down K and multiply-adds the dequantized fp32 weights with x's rows (padded to a power of
  two) in fp32, a running sum [BLOCK_M, BLOCK_K / 8, BLOCK_N] kept in the packed tile's
  layout (nibble j of every word taken in turn), summed across the key tile at the end.
- `_w4a16_dot_kernel`, more rows: [BLOCK_M, BLOCK_N] output tiles (grouped along M for L2
  reuse of the weight tiles), the dequantized [BLOCK_K / 8, 8, BLOCK_N] tile reshaped to
  [BLOCK_K, BLOCK_N] (row order k0 + 8i + j kept), rounded to x's dtype and multiplied on the
  tensor cores with x's tile, summed in fp32 (fp32 x: an IEEE fp32 dot). The weight's rounding
  to bf16 / fp16 (2^-9 / 2^-12 relative) is the one difference from the reference beyond the
  order of the sums.

Default tilings (`gemv_config`, `dot_config`): chosen from H200 runs at llama3-8b's four
projections, bf16, group 128, times of CUDA graph replays.
- One row, groups of whole words (GPTQ's and AWQ's usual 128, no act-order): the lean GEMV
  (`_w4a16_gemv_lean_kernel`), 8 warps; 8 columns x 2,048 keys, 1,024 keys where N > 4,096 >= K
  (q/k/v), 32 x 512 where N >= 16,384 (gate/up); the best of 36 lean tilings at each projection
  (session 18's sweep, weights cycled past L2): 6.8 / 9.8 / 33.6 / 19.7 us (o / qkv / gate_up
  / down), against the plain GEMV's 16.2 / 16.8 / 72.2 / 54.9 and bf16 cuBLAS's 13.5 / 17.1 /
  63.4 / 35.7: 1.2 to 1.7 TB/s of packed weights.
- The plain GEMV (2-4 rows, act-order, groups of part words): 8 columns (GPTQ's words are
  contiguous along N: 32 bytes, a whole DRAM sector, of each packed row) x 512 keys, 4 warps. At
  one row 15.3 / 15.4 / 69.7 / 54.9 us (o / qkv / gate_up / down), within 16% of the best of
  five other tilings at each, but SLOWER than bf16 cuBLAS (10.4 / 15.3 / 56.3 / 31.6 us) while
  reading a quarter of the bytes: bound by its instructions (about 12 a weight compiled for
  sm_90, a quarter-rate int-to-float among them; the lean kernel about 9).
  Per-row multiply-adds grow with the rows: 25 us at 4 rows, 63 at 8, 266 at 16 (o).
- 5..16 rows: the tensor-core kernel with 16 x 32 x 256 tiles, 4 warps, 4 stages: 38.7 and
  38.6 us at 8 and 16 rows (o), 86 (gate_up), against the GEMV's 63 / 266 and 227 / 793.
- act-order (g_idx: a scale and zero gathered per weight) costs more: 21 us at one row (o),
  662 us at 2,048 rows (against 15 and 297 with plain groups).
- More rows: 64 x 128 x 128 (64 keys with g_idx), 4 warps, 3 stages below 1,024 rows (300
  rows: 74.5 / 72.6 / 325 / 255 us against 64 x 128 x 64's 137 / 140 / 334 / 513), 128 x 128 x
  64, 8 warps, 3 stages from 1,024 (2,048 rows: 225 / 335 / 1,523 / 779 us); the 1,024
  boundary is a guess between the two sizes measured. bf16 cuBLAS is 2.2 to 4.1 times faster
  at both sizes (each row tile dequantizes its programs' weights again; unprofiled).

PDL (kernels/pdl.py): the GEMV requests its first weight tile (and the tile's scales and
zeros: constants) before waiting for the kernel that writes x; the dot kernel waits first.
No launch reads a tensor's values on the host: CUDA graphs capture them. On CPU tensors under
TRITON_INTERPRET=1 the same kernels run (the tests), their dots on operands widened to fp32
(UPCAST: the interpreter's bf16 products are garbage, kernels/triton_paged_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.int4_linear import PACK, check_int4_weight
from kernels.pdl import pdl_begin, pdl_kwargs, pdl_trigger, pdl_wait

GEMV_MAX_ROWS = 16  # the most rows the GEMV takes
GEMV_ROWS = 4  # the most it is chosen for (more: the tensor-core kernel, see the top)
GROUP_PER_TILE, GROUP_PER_WORD, GROUP_PER_ROW = 0, 1, 2  # the GROUPS constexpr


@triton.jit
def _dequantize(packed, k0, i, words_ok, cols, col_ok, s_ptr, z_ptr, g_ptr, group_size, N,
                GROUPS: tl.constexpr, HAS_G_IDX: tl.constexpr):
    """packed int32 [BKP, BLOCK_N], words (k0 / 8 + i) of columns `cols` -> the weights fp32
    [BKP, 8, BLOCK_N]: element [i, j, n] is input row k0 + 8i + j. Rows past K (words_ok
    false) get scale 0, so zeros, whatever their zero point."""
    j = tl.arange(0, 8)
    q = ((packed[:, None, :] >> (4 * j)[None, :, None]) & 0xF).to(tl.float32)
    if GROUPS == 0:  # the tile in one group: a row of scales
        off = (k0 // group_size) * N + cols
        s = tl.load(s_ptr + off, mask=col_ok, other=0.0).to(tl.float32)[None, None, :]
        z = tl.load(z_ptr + off, mask=col_ok, other=0.0).to(tl.float32)[None, None, :]
    elif GROUPS == 1:  # a group per word (8 rows)
        g = (k0 + 8 * i) // group_size
        off = g[:, None] * N + cols[None, :]
        ok = words_ok[:, None] & col_ok[None, :]
        s = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)[:, None, :]
        z = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)[:, None, :]
    else:  # a group per row
        k = k0 + 8 * i[:, None] + j[None, :]  # [BKP, 8]
        if HAS_G_IDX:
            g = tl.load(g_ptr + k, mask=words_ok[:, None], other=0)
        else:
            g = k // group_size
        off = g[:, :, None] * N + cols[None, None, :]
        ok = words_ok[:, None, None] & col_ok[None, None, :]
        s = tl.load(s_ptr + off, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)
    return (q - z) * s


@triton.jit
def _load_words(qw_ptr, k0, i, cols, col_ok, N, K, EVEN_K: tl.constexpr):
    """The packed tile [BKP, BLOCK_N] at words k0 / 8 + i (0 past K), and which words are in K."""
    words = k0 // 8 + i
    if EVEN_K:
        words_ok = tl.full(i.shape, 1, tl.int1)
    else:
        words_ok = words < K // 8
    packed = tl.load(qw_ptr + words[:, None] * N + cols[None, :], mask=words_ok[:, None] & col_ok[None, :], other=0)
    return packed, words_ok


@triton.jit
def _word_scales(k, ok, cols, col_ok, s_ptr, z_ptr, g_ptr, group_size, N, HAS_G_IDX: tl.constexpr):
    """Scales and zeros fp32 [BKP, BLOCK_N] of input rows k [BKP] (ok: the rows in K)."""
    if HAS_G_IDX:
        g = tl.load(g_ptr + k, mask=ok, other=0)
    else:
        g = k // group_size
    off = g[:, None] * N + cols[None, :]
    both = ok[:, None] & col_ok[None, :]
    s = tl.load(s_ptr + off, mask=both, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + off, mask=both, other=0.0).to(tl.float32)
    return s, z


# M (1..16 rows, padded to BLOCK_M) is not specialized: one compiled variant per BLOCK_M and shape.
@triton.jit(do_not_specialize=["M"])
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, M, N, K, group_size, stride_xm, stride_om,
    GROUPS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):
    """Everything in the packed tile's [BKP, BLOCK_N] layout: nibble j of every word (input
    rows k0 + 8i + j) is taken in turn (unrolled), multiplied with x's values at those rows (a
    load strided by 8, from L1) and added into a [BLOCK_M, BKP, BLOCK_N] running sum, summed
    across BKP once at the end. (The [BKP, 8, BLOCK_N] tile with a sum over its nibbles
    compiled to a shared-memory layout change and shuffles every step.)"""
    pdl_trigger(PDL)
    BKP: tl.constexpr = BLOCK_K // 8
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    i = tl.arange(0, BKP)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BKP, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        packed, words_ok = _load_words(qw_ptr, k0, i, cols, col_ok, N, K, EVEN_K)
        if GROUPS == 0:  # the tile in one group: a row of scales
            off = (k0 // group_size) * N + cols
            s = tl.load(s_ptr + off, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + off, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        elif GROUPS == 1:  # a group per word
            s, z = _word_scales(k0 + 8 * i, words_ok, cols, col_ok, s_ptr, z_ptr, g_ptr, group_size, N, False)
        if k0 == 0:
            pdl_wait(PDL)  # x is written by the kernel before; the weights are constants
        for j in tl.static_range(8):
            k = k0 + 8 * i + j
            if GROUPS == 2:  # a group per row
                s, z = _word_scales(k, words_ok, cols, col_ok, s_ptr, z_ptr, g_ptr, group_size, N, HAS_G_IDX)
            w = (((packed >> (4 * j)) & 0xF).to(tl.float32) - z) * s
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & words_ok[None, :], other=0.0).to(tl.float32)
            acc += x[:, :, None] * w[None, :, :]
    out = tl.sum(acc, axis=1)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemv_lean_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, M, N, K, group_size, stride_xm, stride_om,
    GROUPS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PDL: tl.constexpr,
):
    """One row (BLOCK_M 1) with groups of whole words (GROUPS 0 or 1), fewer instructions a
    weight than `_w4a16_gemv_kernel`: the scale and zero factored out of each word's 8-term sum,

        sum_j (q_j - z) s x_j = s (sum_j q_j x_j - z sum_j x_j),

    each x value loaded once per word row and shared by the thread's columns, and each nibble
    widened without an int-to-float conversion: placed in mantissa bits 19..22 of 1.0 it is the
    fp32 f = 1 + q / 16, and sum_j q_j x_j = 16 (sum_j f_j x_j - sum_j x_j), whose subtraction
    loses about 2^-24 of sum |x_j| (f is within [1, 2), so no large terms cancel): a shift, a
    logic op and a multiply-add a weight."""
    pdl_trigger(PDL)
    BKP: tl.constexpr = BLOCK_K // 8
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    i = tl.arange(0, BKP)
    acc = tl.zeros([BKP, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K and EVEN_N:  # unmasked: a thread's columns load as one vector
            words_ok = tl.full(i.shape, 1, tl.int1)
            packed = tl.load(qw_ptr + (k0 // 8 + i)[:, None] * N + cols[None, :])
        else:
            packed, words_ok = _load_words(qw_ptr, k0, i, cols, col_ok, N, K, EVEN_K)
        packed = packed.to(tl.uint32, bitcast=True)
        if GROUPS == 0:  # the tile in one group: a row of scales
            off = (k0 // group_size) * N + cols
            s = tl.load(s_ptr + off, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + off, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:  # a group per word
            s, z = _word_scales(k0 + 8 * i, words_ok, cols, col_ok, s_ptr, z_ptr, g_ptr, group_size, N, False)
        if k0 == 0:
            pdl_wait(PDL)  # x is written by the kernel before; the weights are constants
        fx = tl.zeros([BKP, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([BKP, 1], dtype=tl.float32)
        for j in tl.static_range(8):
            # [BKP, 1]: loaded in the packed tile's layout, each thread's x shared by its columns
            x = tl.load(x_ptr + k0 + 8 * i[:, None] + j, mask=words_ok[:, None], other=0.0).to(tl.float32)
            # The nibble as mantissa bits 19..22 of 1.0: f = 1 + q / 16, exactly.
            f = ((((packed >> (4 * j)) & 0xF) << 19) | 0x3F800000).to(tl.float32, bitcast=True)
            fx += f * x
            xs += x
        # sum_j (q_j - z) x_j = 16 (sum_j f_j x_j - sum_j x_j) - z sum_j x_j
        acc += s * (16.0 * (fx - xs) - z * xs)
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["M"])
def _w4a16_dot_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, M, N, K, group_size, stride_xm, stride_om,
    GROUPS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    # Programs in groups of GROUP_M row tiles, down each column tile in turn: a group's programs
    # share their weight tiles in L2 (each is dequantized once per row tile regardless).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    BKP: tl.constexpr = BLOCK_K // 8
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    i = tl.arange(0, BKP)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        packed, words_ok = _load_words(qw_ptr, k0, i, cols, col_ok, N, K, EVEN_K)
        w = _dequantize(packed, k0, i, words_ok, cols, col_ok, s_ptr, z_ptr, g_ptr, group_size, N,
                        GROUPS, HAS_G_IDX)
        k = k0 + ks
        if EVEN_K:
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter: the weights rounded as on the GPU, both widened, an IEEE dot
            w = tl.reshape(w.to(x.dtype).to(tl.float32), [BLOCK_K, BLOCK_N])
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        elif x.dtype == tl.float32:
            acc = tl.dot(x, tl.reshape(w, [BLOCK_K, BLOCK_N]), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.reshape(w.to(x.dtype), [BLOCK_K, BLOCK_N]), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---- tilings and the launcher --------------------------------------------------------------------


@dataclass(frozen=True)
class Int4GemvConfig:
    """The GEMV's tiling (at most GEMV_MAX_ROWS rows): output columns and keys a program holds
    (keys: a power of two, at least 8), warps."""

    block_n: int
    block_k: int
    num_warps: int
    lean: bool = False  # one row, groups of whole words: `_w4a16_gemv_lean_kernel`


@dataclass(frozen=True)
class Int4DotConfig:
    """The tensor-core kernel's tiling: rows x columns x keys a program (powers of two; rows,
    columns and keys at least 16), warps, pipeline stages, row tiles a program group walks."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def gemv_config(m: int, n: int, k: int, lean: bool = True) -> Int4GemvConfig:
    """One row (lean: the caller's groups fit `_w4a16_gemv_lean_kernel`): the lean kernel's tiling
    by shape (the top of this file). Otherwise 8 columns x 512 keys, 4 warps, the key tile at most
    K rounded up to a power of two; past 4 rows (explicit configs only) it shrinks as the rows
    grow, 256 at 8, 128 at 16: 16,384 products a step, 54 to 80 registers compiled for sm_90."""
    if m == 1 and lean:
        block_n, block_k = (32, 512) if n >= 16384 else (8, 1024) if n > 4096 >= k else (8, 2048)
        return Int4GemvConfig(block_n, max(8, min(block_k, triton.next_power_of_2(k))), num_warps=8, lean=True)
    block_m = triton.next_power_of_2(max(m, 1))
    block_k = min(512, 2048 // block_m, triton.next_power_of_2(k))
    return Int4GemvConfig(block_n=8, block_k=max(8, block_k), num_warps=4)


def dot_config(m: int, n: int, k: int, g_idx: bool = False) -> Int4DotConfig:
    """16 x 32 x 256 up to 16 rows, 64 x 128 x 128 below 1,024 (64 keys with g_idx: its gathered
    [128, 128] scales and zeros spilled, 255 registers compiled for sm_90), 128 x 128 x 64 from
    there (the top of this file); keys at most K rounded up to a power of two, at least 16."""
    if m <= 16:
        return Int4DotConfig(block_m=16, block_n=32, block_k=max(16, min(256, triton.next_power_of_2(k))),
                             num_warps=4, num_stages=4)
    if m < 1024:
        keys = 64 if g_idx else 128
        return Int4DotConfig(block_m=64, block_n=128, block_k=max(16, min(keys, triton.next_power_of_2(k))),
                             num_warps=4, num_stages=3)
    return Int4DotConfig(block_m=128, block_n=128, block_k=max(16, min(64, triton.next_power_of_2(k))),
                         num_warps=8, num_stages=3)


def _groups(block_k: int, k: int, num_groups: int, has_g_idx: bool) -> tuple[int, int]:
    """(GROUPS, group size) for a key tile of block_k rows."""
    if has_g_idx:
        return GROUP_PER_ROW, 1
    size = k // num_groups
    if size % block_k == 0:
        return GROUP_PER_TILE, size
    return (GROUP_PER_WORD if size % PACK == 0 else GROUP_PER_ROW), size


def w4a16_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: Int4GemvConfig | Int4DotConfig | None = None,
) -> torch.Tensor:
    """`w4a16_linear_ref` for x [..., K] (bf16/fp16; fp32 too, an IEEE dot): the GEMV for at
    most GEMV_ROWS rows, the tensor-core kernel for more (`config` picks the kernel when given,
    an Int4GemvConfig for at most GEMV_MAX_ROWS). qweight int32 [K / 8, N], scales and zeros
    [G, N], g_idx int32 [K] (optional)."""
    k, n, num_groups = check_int4_weight(qweight, scales, zeros, g_idx)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k} input rows")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"w4a16_linear_triton takes bf16, fp16 or fp32 activations, not {x.dtype}")
    if qweight.numel() >= 2**31 or scales.numel() >= 2**31:
        raise ValueError("the kernels index the weight with int32 offsets: at most 2^31 - 1 words")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    out2 = out.view(m, n)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if g_idx is not None and (g_idx.dtype != torch.int32 or not g_idx.is_contiguous()):
        g_idx = g_idx.to(torch.int32).contiguous()
    if bias is not None:
        bias = bias.contiguous()
    # The lean GEMV takes groups of whole words (not act-order, not groups of part words).
    lean = g_idx is None and (k // num_groups) % PACK == 0
    cfg = config or (gemv_config(m, n, k, lean) if m <= GEMV_ROWS else dot_config(m, n, k, g_idx is not None))
    groups, group_size = _groups(cfg.block_k, k, num_groups, g_idx is not None)
    args = (x2, qweight, scales, zeros, g_idx if g_idx is not None else qweight, bias if bias is not None else scales,
            out2, m, n, k, group_size, x2.stride(0), out2.stride(0))
    flags = dict(GROUPS=groups, HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n,
                 BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps, **pdl_kwargs(x.device))
    if isinstance(cfg, Int4GemvConfig):
        if m > GEMV_MAX_ROWS:
            raise ValueError(f"the GEMV takes at most {GEMV_MAX_ROWS} rows, got {m}")
        if cfg.lean and m == 1 and groups != GROUP_PER_ROW:
            _w4a16_gemv_lean_kernel[(triton.cdiv(n, cfg.block_n),)](
                *args, BLOCK_M=1, EVEN_N=n % cfg.block_n == 0, **flags
            )
            return out
        _w4a16_gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
            *args, BLOCK_M=triton.next_power_of_2(m), **flags,
        )
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _w4a16_dot_kernel[grid](
            *args, BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, UPCAST=x.device.type == "cpu",
            num_stages=cfg.num_stages, **flags,
        )
    return out
