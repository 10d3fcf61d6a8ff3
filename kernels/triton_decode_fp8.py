"""Decode attention over an fp8 cache with the products in fp8: keys as the tensor-core rows.

`kernels.triton_paged_attention` widens each e4m3 K/V tile to fp16 in registers before its
products, with the query rows as the product's M dimension: a decode's 1-16 query heads padded
to 16 rows. On Hopper that path is register- and latency-bound (T's decode attention over fp8:
2-warp tiles at 255 registers, ~2.1 TB/s, where the bf16 cache streams at ~3.7).

Here a program owns one (sequence, KV head, key slice) and turns both products around so the
keys are the long dimension:

    S^T [keys, heads] = K [keys, d] . Q^T [d, heads]         (contracts over d)
    O^T [d, heads]   += V^T [d, keys] . P^T [keys, heads]     (contracts over keys)

Every operand is e4m3: K as the cache holds it, V^T from a `keys_contiguous` V cache (each
block's keys at consecutive addresses, kernels/kv_cache.py), Q^T quantized in the program with
one scale per head (amax / 448), and P^T (in [0, 1]) rounded to e4m3 as FlashAttention-3's fp8
path does. So the tiles go from shared memory into Hopper's fp8 warpgroup products (64 rows:
TILE_N keys, then d) with no widening, and the accumulators are small: [TILE_N, 16] and
[d, 16] fp32 over a warpgroup. The query heads of a group pad to 16 columns (up to 16 heads).
q and p may each be kept as two e4m3 terms (`_split_e4m3`: ~7 significant bits instead of 4);
the default launch (kernels/triton_paged_attention.py, DECODE_FP8_TILING) takes two for q and
one for p (docs/ARCHITECTURE.md, FP8: the precision decision and the H200 figures).

The softmax runs down each column (a head); each thread sums its own keys' p and the sums are
added once at the end, so the tile's max is the only reduction across the warpgroup. Split
slices write the same partial outputs and log-sum-exps as the general kernel's and merge
through its `_reduce_splits_kernel`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.kv_cache import is_fp8, key_run, keys_contiguous
from kernels.pdl import pdl_begin, pdl_kwargs
from kernels.triton_kv_cache import _FP8_MAX, _round_e4m3

MASKED_SCORE = tl.constexpr(-1.0e30)


@triton.jit
def _to_e4m3(x, E4M3: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x (within +-448) rounded to e4m3 (the cache's dtype E4M3); under UPCAST (the CPU
    interpreter, whose cast does not round to nearest even) the same values kept in fp32."""
    if UPCAST:
        return _round_e4m3(x)
    return x.to(E4M3)


TERM_LO = tl.constexpr(1.0 / 16)  # the second term's weight: it is stored x 16


@triton.jit
def _split_e4m3(x, E4M3: tl.constexpr, TERMS: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 x (within +-448) as e4m3 terms: hi = x rounded, and with TERMS == 2 also lo = the
    remainder x 16 rounded, so that hi + lo / 16 holds x to ~7 significant bits (bf16's 8) where
    hi alone holds 4. (TERMS == 1 returns hi twice.)"""
    hi = _to_e4m3(x, E4M3, UPCAST)
    if TERMS == 1:
        return hi, hi
    lo = _to_e4m3((x - hi.to(tl.float32)) * 16.0, E4M3, UPCAST)
    return hi, lo


@triton.jit
def _dot8(a, b, acc, UPCAST: tl.constexpr):
    """a @ b + acc over e4m3 operands, in fp32. UPCAST: Triton's CPU interpreter, which has no
    fp8 product; the operands are widened exactly (every e4m3 value is an fp32 value)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, out_dtype=tl.float32)


@triton.jit
def _tile_blocks(table_ptr, tile, seq_len, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The cache block of each key of tile `tile` (a tile that starts before seq_len): one scalar
    where the tile lies in one block (BLOCK_SIZE a multiple of TILE_N: one load a tile, and the
    tile's K rows and V runs in one block), else a vector of TILE_N (0 for keys past seq_len)."""
    if BLOCK_SIZE % TILE_N == 0:
        block = tl.load(table_ptr + tile * TILE_N // BLOCK_SIZE)
    else:
        keys = tile * TILE_N + tl.arange(0, TILE_N)
        block = tl.load(table_ptr + keys // BLOCK_SIZE, mask=keys < seq_len, other=0)
    return block.to(tl.int64)


@triton.jit
def _decode_tile(
    qt, qt_lo, col_scale, acc, acc_lo, l_i, m_i, tile, block, k_cache_ptr, v_cache_ptr, kv_head, seq_len,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vh, stride_vd, dims,
    TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, V_RUN: tl.constexpr,
    Q_TERMS: tl.constexpr, P_TERMS: tl.constexpr, UPCAST: tl.constexpr,
):
    """Fold keys [tile * TILE_N, (tile + 1) * TILE_N) into each head's running softmax. block:
    the cache block of each key (`_tile_blocks`)."""
    keys = tile * TILE_N + tl.arange(0, TILE_N)
    if MASKED:
        key_ok = keys < seq_len
    in_block = keys % BLOCK_SIZE
    k_ptrs = k_cache_ptr + (block * stride_kb + in_block * stride_ks + kv_head * stride_kh)[:, None] + dims[None, :]
    v_off = (block * stride_vb + in_block + kv_head * stride_vh)[None, :] + dims[:, None] * stride_vd
    v_ptrs = v_cache_ptr + tl.max_contiguous(tl.multiple_of(v_off, [1, V_RUN]), [1, V_RUN])
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if Q_TERMS == 2:
        st = _dot8(k, qt, _dot8(k, qt_lo, None, UPCAST) * TERM_LO, UPCAST)
    else:
        st = _dot8(k, qt, None, UPCAST)
    st = st * col_scale[None, :]  # [TILE_N, heads], log2 units
    if MASKED:
        st = tl.where(key_ok[:, None], st, MASKED_SCORE)
    m_new = tl.maximum(m_i, tl.max(st, 0))
    p = tl.math.exp2(st - m_new[None, :])
    alpha = tl.math.exp2(m_i - m_new)
    # Each thread sums its own keys' p; summed down the keys once, after the last tile: the max
    # above is the one reduction across the warpgroup a tile (keys are spread over its 4 warps).
    l_i = l_i * alpha[None, :] + p
    if MASKED:
        # Masked by whole blocks, so the loads keep V_RUN-key vectors; a block's unwritten slots
        # past seq_len then zeroed in registers (their p is 0, but 0 x NaN would not be).
        block_ok = (keys // V_RUN) * V_RUN < seq_len
        vt = tl.load(v_ptrs, mask=block_ok[None, :], other=0.0)
        vt = tl.where(key_ok[None, :], vt, 0.0)
    else:
        vt = tl.load(v_ptrs)
    p_hi, p_lo = _split_e4m3(p, v_cache_ptr.dtype.element_ty, P_TERMS, UPCAST)
    acc = _dot8(vt, p_hi, acc * alpha[None, :], UPCAST)  # [d, heads]
    if P_TERMS == 2:
        acc_lo = _dot8(vt, p_lo, acc_lo * alpha[None, :], UPCAST)
    return acc, acc_lo, l_i, m_new


@triton.jit(do_not_specialize=["first_seq", "stride_bt"])
def _decode_fp8_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, v_scale, first_seq,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vh, stride_vd,
    stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, V_RUN: tl.constexpr,
    Q_TERMS: tl.constexpr, P_TERMS: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    num_kv_heads = NUM_HEADS // GROUP
    seq = tl.program_id(0) // num_kv_heads  # the kv head fastest: programs at once share blocks
    kv_head = tl.program_id(0) % num_kv_heads
    split = tl.program_id(1)
    seq += first_seq  # offset here, not by slicing on the host (see the general kernel)
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)  # a decode: one query per sequence
    seq_len = tl.load(seq_lens_ptr + seq)

    cols = tl.arange(0, GROUP_PAD)
    col_ok = cols < GROUP
    head = kv_head * GROUP + cols
    dims = tl.arange(0, HEAD_DIM)
    qt = tl.load(
        q_ptr + token * stride_qt + head[None, :] * stride_qh + dims[:, None], mask=col_ok[None, :], other=0.0
    ).to(tl.float32)  # [d, heads]
    q_scale = tl.maximum(tl.max(tl.abs(qt), 0), 1e-30) / _FP8_MAX
    qt, qt_lo = _split_e4m3(qt / q_scale[None, :], k_cache_ptr.dtype.element_ty, Q_TERMS, UPCAST)
    col_scale = q_scale * qk_scale

    num_tiles = tl.cdiv(seq_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    num_full = seq_len // TILE_N

    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_N, GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM, GROUP_PAD], dtype=tl.float32)
    acc_lo = tl.zeros([HEAD_DIM, GROUP_PAD], dtype=tl.float32)  # P_TERMS == 2: the p_lo products
    for tile in range(tile_lo, tl.minimum(tile_hi, num_full)):
        block = _tile_blocks(table_ptr, tile, seq_len, TILE_N, BLOCK_SIZE)
        acc, acc_lo, l_i, m_i = _decode_tile(
            qt, qt_lo, col_scale, acc, acc_lo, l_i, m_i, tile, block, k_cache_ptr, v_cache_ptr, kv_head, seq_len,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vh, stride_vd, dims,
            TILE_N, BLOCK_SIZE, False, V_RUN, Q_TERMS, P_TERMS, UPCAST,
        )
    for tile in range(tl.maximum(tile_lo, num_full), tile_hi):  # the last tile, if partial
        block = _tile_blocks(table_ptr, tile, seq_len, TILE_N, BLOCK_SIZE)
        acc, acc_lo, l_i, m_i = _decode_tile(
            qt, qt_lo, col_scale, acc, acc_lo, l_i, m_i, tile, block, k_cache_ptr, v_cache_ptr, kv_head, seq_len,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vh, stride_vd, dims,
            TILE_N, BLOCK_SIZE, True, V_RUN, Q_TERMS, P_TERMS, UPCAST,
        )

    l_i = tl.maximum(tl.sum(l_i, 0), 1.0)  # as the general kernel: an empty slice weighs 0 in the merge
    if P_TERMS == 2:
        acc += acc_lo * TERM_LO
    out = acc / l_i[None, :] * v_scale  # [d, heads]
    store_ok = col_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + token * stride_ot + head[None, :] * stride_oh + dims[:, None],
            out.to(out_ptr.dtype.element_ty), mask=store_ok,
        )
    else:
        part_row = (token * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part_row[None, :] * HEAD_DIM + dims[:, None], out, mask=store_ok)
        tl.store(part_lse_ptr + part_row, m_i + tl.math.log2(l_i), mask=col_ok)


@dataclass(frozen=True)
class DecodeFp8Config:
    """Launch shape of `_decode_fp8_kernel`: keys a tile (the first product's 64+ rows), key
    slices, warps (a multiple of 4: whole warpgroups), pipeline stages."""

    tile_n: int
    num_splits: int
    num_warps: int
    num_stages: int
    q_terms: int = 2  # e4m3 terms of q and of p (`_split_e4m3`): 1 or 2
    p_terms: int = 1
    max_registers: int | None = None  # ptxas's cap a thread (maxnreg); on a GPU only


def launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    qk_scale_log2: float,
    v_scale: float,
    out: torch.Tensor,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    cfg: DecodeFp8Config,
    first_seq: int,
    num_seqs: int,
) -> None:
    """Decode attention for sequences [first_seq, + num_seqs), one query each. qk_scale_log2:
    softmax scale x k_scale x log2(e). With key slices (cfg.num_splits > 1) the partials go to
    part_out / part_lse for `_reduce_splits_kernel`, else the output to `out`."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    splits = cfg.num_splits
    cap = {"maxnreg": cfg.max_registers} if cfg.max_registers and q.is_cuda else {}
    _decode_fp8_kernel[(num_seqs * num_kv_heads, splits)](
        q, k_cache, v_cache, out, part_out, part_lse,
        block_tables, seq_lens, query_start_loc, qk_scale_log2, v_scale, first_seq,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(2), v_cache.stride(3),
        block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=16, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE_N=cfg.tile_n, NUM_SPLITS=splits, V_RUN=key_run(block_size, cfg.tile_n),
        Q_TERMS=cfg.q_terms, P_TERMS=cfg.p_terms,
        UPCAST=q.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(q.device), **cap,
    )


_ENV = os.environ.get("PAGODA_FP8_DECODE", "1")
if _ENV not in ("0", "1"):
    raise ValueError(f"PAGODA_FP8_DECODE must be 0 or 1, not {_ENV!r}")


def supports(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel can read these caches for num_heads query heads: an fp8 cache whose V
    keeps a block's keys contiguous, 1-16 query heads a KV head, a head dim of 64, 128 or 256,
    blocks of a multiple of 16 slots."""
    if not (is_fp8(k_cache) and keys_contiguous(v_cache)):
        return False
    group = num_heads // k_cache.shape[2]
    return group <= 16 and k_cache.shape[3] in (64, 128, 256) and k_cache.shape[1] % 16 == 0


def applies(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether decode-only launches over these caches run here by default: `supports`, on Hopper's
    fp8 warpgroup products (compute capability 9.0+; on the CPU, Triton's interpreter: the tests).
    PAGODA_FP8_DECODE=0 sends them to the general kernel."""
    if _ENV == "0" or not supports(num_heads, k_cache, v_cache):
        return False
    if k_cache.device.type == "cuda":
        return _hopper(k_cache.device.index or 0)
    return k_cache.device.type == "cpu"


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)
