"""Paged attention in Triton: one varlen kernel for prefill chunks and decodes alike.

Same function as `kernels.paged_attention.paged_attention_ref`: sequence b's queries are its
last q_len positions of seq_len, query i sees keys 0 .. seq_len - q_len + i, and K/V are read
through the block table from a cache laid out `[num_blocks, block_size, num_kv_heads, d]`.

A program owns one KV head and a tile of BLOCK_M query rows: BLOCK_Q consecutive tokens of
one sequence times the GROUP query heads that share the KV head (row r is token r // GROUP,
head r % GROUP), so K and V are loaded once per group (GQA) and a decode still fills the
16 rows a tensor-core product needs. Keys come in tiles of TILE_N, each key's cache row found
through the block table, so TILE_N is free of the cache's block size. The tiles every row of
the program sees run unmasked; only the last, diagonal ones pay for the causal mask.

For few programs (decode at small batch) the key range is cut into NUM_SPLITS slices: each
slice writes an fp32 partial output and its log-sum-exp, and `_reduce_splits_kernel` merges
them. The slice bounds come from each sequence's own length inside the kernel, so the
launch depends only on tensor shapes: no host sync, and safe to capture in a CUDA graph.

An fp8 cache (KV_FP8, kernels/kv_cache.py) is loaded as e4m3 (half the bytes of a 16-bit
cache) and widened in registers before each product, to fp16 for a bf16 model (q converted
once: e4m3 -> fp16 is one instruction for two values, -> bf16 one more for each) and to q's
dtype otherwise; k_scale is folded into the softmax scale on the host and v_scale multiplies
the output. The output keeps q's dtype.

The V cache may be `keys_contiguous` (kernels/kv_cache.py: each block's memory [kv_heads, d,
block_size], what the GPU worker binds for an fp8 cache): P.V contracts over keys, and its
tensor-core operand wants neighbouring keys in one register, which a d-contiguous e4m3 tile gives
only byte by byte out of shared memory (on the H200, T's decode attention over fp8: 147 us
against 162). V_RUN tells the loads how many keys of a tile lie at consecutive addresses.

Decode-only launches over such a cache (fp8, V keys-contiguous) on Hopper go to
`kernels.triton_decode_fp8` instead, whose products are in fp8 with the keys as the rows
(`triton_decode_fp8.applies`; a `DecodeFp8Config` as `config` forces it, an `AttentionConfig`
this kernel).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels import triton_decode_fp8
from kernels.kv_cache import is_fp8, key_run, keys_contiguous
from kernels.pdl import pdl_begin, pdl_kwargs
from kernels.triton_decode_fp8 import DecodeFp8Config

LOG2_E = 1.4426950408889634
# Score of a masked key: finite, so that a row that sees no key in a slice gives exp2(0) = 1
# rather than NaN, and its slice weighs exp2(-1e30 - max) = 0 in the merge.
MASKED_SCORE = tl.constexpr(-1.0e30)


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that owns global q block `q_block`.

    Sequence b's q blocks start at query_start_loc[b] // BLOCK_Q + b: an upper bound on the
    blocks before it that needs no prefix sum over the batch, found again here by bisection.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b (+ acc) in fp32. UPCAST works around Triton's CPU interpreter, whose bf16 products
    come out as garbage (3.9): the operands, already rounded as on the GPU, are widened first."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _attend_tile(
    q, acc, l_i, m_i, tile, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, q_pos, kv_end, qk_scale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
    dims, dim_ok,
    TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, KV_FP8: tl.constexpr, V_RUN: tl.constexpr,
):
    """Fold keys [tile * TILE_N, (tile + 1) * TILE_N) into the running softmax of each row."""
    keys = tile * TILE_N + tl.arange(0, TILE_N)
    if MASKED:
        key_ok = keys < kv_end
        block = tl.load(table_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        kv_ok = key_ok[:, None] & dim_ok[None, :]
    else:
        block = tl.load(table_ptr + keys // BLOCK_SIZE).to(tl.int64)
        kv_ok = dim_ok[None, :]
    in_block = (keys % BLOCK_SIZE)[:, None]
    k_ptrs = k_cache_ptr + block[:, None] * stride_kb + in_block * stride_ks + kv_head * stride_kh + dims[None, :]
    if V_RUN:  # V `keys_contiguous`: runs of V_RUN keys at consecutive addresses for each d
        v_off = block[:, None] * stride_vb + in_block + kv_head * stride_vh + dims[None, :] * stride_vd
        v_off = tl.max_contiguous(tl.multiple_of(v_off, [V_RUN, 1]), [V_RUN, 1])
        v_ptrs = v_cache_ptr + v_off
    else:
        v_ptrs = v_cache_ptr + block[:, None] * stride_vb + in_block * stride_vs + kv_head * stride_vh + dims[None, :]
    # Open tiles of a power-of-two head dim load unmasked: the common case stays branch-free.
    if MASKED or not EVEN_D:
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
    else:
        k = tl.load(k_ptrs)
    if KV_FP8:
        k = k.to(q.dtype)  # exact: every e4m3 value is a bf16/fp16/fp32 value
    s = _dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST) * qk_scale
    if MASKED:
        s = tl.where(keys[None, :] <= q_pos[:, None], s, MASKED_SCORE)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED or not EVEN_D:
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["first_seq", "num_seqs", "stride_bt"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, v_scale, first_seq, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, KV_FP8: tl.constexpr,
    V_RUN: tl.constexpr, PDL: tl.constexpr,
):
    pdl_begin(PDL)
    # Grid axis 0 is (q block, kv head), the kv head fastest: the programs running at once read
    # every head of the same cache blocks (measured at T's decode shapes: 3% faster than the kv
    # head slowest, over bf16 and fp8 caches alike). Last q block first: with causal prefill the
    # late blocks of a sequence carry the most keys, and starting them first keeps the tail of
    # the launch short.
    num_kv_heads = NUM_HEADS // GROUP
    q_block = tl.num_programs(0) // num_kv_heads - 1 - tl.program_id(0) // num_kv_heads
    kv_head = tl.program_id(0) % num_kv_heads
    split = tl.program_id(1)
    # This launch's sequences start at first_seq: offset here rather than by slicing on the
    # host, whose pointers' alignment would vary and make Triton compile a variant per kind.
    block_tables_ptr += first_seq * stride_bt
    seq_lens_ptr += first_seq
    query_start_loc_ptr += first_seq

    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    if seq < 0:
        return  # before the first sequence: query_start_loc need not start at 0 (see num_decodes)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    first_q = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_q >= q_len:
        return  # a spare block of the upper-bound grid
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = first_q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = prefix + q_idx  # row sees keys 0 .. q_pos
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    token = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    if KV_FP8 and q.dtype == tl.bfloat16:
        # Products over an e4m3 cache in fp16: e4m3 -> fp16 is one instruction for two values,
        # e4m3 -> bf16 goes through fp16 and takes one more for each. q (bf16, 8 significant
        # bits) is exact in fp16's 11 within its range (2^-14 .. 65504), and p in [0, 1] gains.
        q = q.to(tl.float16)

    last_q = tl.minimum(first_q + BLOCK_Q, q_len) - 1
    kv_end = prefix + last_q + 1  # keys any row of this program sees
    num_tiles = tl.cdiv(kv_end, TILE_N)
    num_open_tiles = (prefix + first_q + 1) // TILE_N  # tiles every row sees whole
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for tile in range(tile_lo, tl.minimum(tile_hi, num_open_tiles)):
        acc, l_i, m_i = _attend_tile(
            q, acc, l_i, m_i, tile, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, q_pos, kv_end, qk_scale,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, dims, dim_ok,
            TILE_N, BLOCK_SIZE, False, HEAD_DIM == HEAD_DIM_PAD, DOT_PRECISION, UPCAST, KV_FP8, V_RUN,
        )
    for tile in range(tl.maximum(tile_lo, num_open_tiles), tile_hi):
        acc, l_i, m_i = _attend_tile(
            q, acc, l_i, m_i, tile, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, q_pos, kv_end, qk_scale,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, dims, dim_ok,
            TILE_N, BLOCK_SIZE, True, HEAD_DIM == HEAD_DIM_PAD, DOT_PRECISION, UPCAST, KV_FP8, V_RUN,
        )

    # l_i >= 1 once any key is folded in (the row's maximum adds exp2(0)); a slice with no tiles
    # has l_i = 0 and m_i = -inf: its partial output is 0 and its weight exp2(-inf) = 0.
    l_i = tl.maximum(l_i, 1.0)
    out = acc / l_i[:, None]
    if KV_FP8:
        out = out * v_scale  # linear: split slices scaled alike merge to the scaled whole
    store_ok = row_ok[:, None] & dim_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty), mask=store_ok,
        )
    else:
        part_row = (token * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], out, mask=store_ok)
        tl.store(part_lse_ptr + part_row, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["first_token"])
def _reduce_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, first_token, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[t, h] = the slices' partial outputs weighted by their share of the softmax mass."""
    pdl_begin(PDL)
    token = first_token + tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    part_row = (token * NUM_HEADS + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part_row)
    weight = tl.math.exp2(lse - tl.max(lse, 0))
    part = tl.load(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], mask=dim_ok[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch shape of one call; `choose_config` picks them, benchmarks sweep them."""

    block_m: int
    tile_n: int
    num_splits: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DeviceLimits:
    num_sms: int
    shared_mem: int  # bytes of shared memory one program may use


H100 = DeviceLimits(num_sms=132, shared_mem=232448)


@functools.cache
def device_limits(device: torch.device) -> DeviceLimits:
    if device.type != "cuda":
        # The interpreter: few "SMs", so that small tests reach the split path.
        return DeviceLimits(num_sms=4, shared_mem=H100.shared_mem)
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return DeviceLimits(num_sms=props["multiprocessor_count"], shared_mem=props["max_shared_mem"])


# Tilings in order of preference, the first that fits the device's shared memory wins.
# (rows, key tile, warps, pipeline stages). The block-table load ahead of each K/V load makes
# Triton's pipeliner count two loads per tile, so multi-buffering K/V takes num_stages >= 5.
_DECODE_TILINGS = [(16, 32, 4, 5), (16, 16, 4, 5), (16, 16, 4, 3)]


def _tiling_from_env(name: str, fields: str = "rows,key_tile,warps,stages") -> list[tuple[int, ...]]:
    """PAGODA_ATTN_DECODE_TILING=rows,key_tile,warps,stages puts one tiling ahead of the list:
    for benchmarks comparing tilings inside the whole engine (`bench kernels --sweep` times
    them alone). `fields`: the names of the positive integers the variable must hold."""
    value = os.environ.get(name, "").strip()
    if not value:
        return []
    try:
        tiling = tuple(int(x) for x in value.split(","))
    except ValueError:
        tiling = ()
    count = len(fields.split(","))
    if len(tiling) != count or any(x <= 0 for x in tiling):
        raise ValueError(f"{name}={value!r}: expected {count} positive integers {fields}")
    return [tiling]


# Query groups of 2 (qwen3-0.6b's 16/8 heads) stream 64-key tiles faster; groups of 4 keep 32.
_DECODE_TILINGS_GROUP_2 = [(16, 64, 4, 5)] + _DECODE_TILINGS
# Over an fp8 cache whose V keeps a block's keys contiguous, groups of 2 take 2 warps (measured at
# T's decode shapes on the H200: 147 us against 162 for 4 warps over a d-contiguous V; 4 warps
# over the same V, 195 us: the warps then each hold a larger share of the widened tile).
_DECODE_TILINGS_GROUP_2_FP8_KEYS = [(16, 64, 2, 5)] + _DECODE_TILINGS_GROUP_2
_ENV_DECODE_TILING = _tiling_from_env("PAGODA_ATTN_DECODE_TILING")
_PREFILL_TILINGS = [(128, 64, 8, 5), (128, 32, 8, 5), (64, 32, 4, 5), (64, 16, 4, 3)]


def _shared_bytes(
    block_m: int, tile_n: int, num_stages: int, head_dim: int, elem: int, kv_elem: int | None = None
) -> int:
    """Q plus the K/V buffers the pipeliner allocates (measured: 5 stages give 2-3 buffers).

    kv_elem: the cache's element size when it differs from q's (fp8: 1). Its buffers take that
    size, plus one key tile widened to q's dtype for Hopper's products (measured: 128x64 prefill
    tiles over an fp8 cache, 82 KB against 132 KB over bf16; scripts/kernel_resources.py --kv-fp8)."""
    buffers = max(1, num_stages - 2)
    if kv_elem is None or kv_elem == elem:
        return (block_m + 2 * buffers * tile_n) * head_dim * elem + 4096
    return (block_m + tile_n) * head_dim * elem + 2 * buffers * tile_n * head_dim * kv_elem + 4096


def _tiling(
    decode: bool, group: int, head_dim: int, elem_size: int, limits: DeviceLimits, kv_elem_size: int | None = None,
    v_keys: bool = False,
) -> tuple[int, ...]:
    """(rows, key tile, warps, stages): the first tiling of the list that fits the device."""
    d = max(16, triton.next_power_of_2(head_dim))
    if decode:
        if group == 2:
            fp8_keys = v_keys and kv_elem_size == 1
            by_group = _DECODE_TILINGS_GROUP_2_FP8_KEYS if fp8_keys else _DECODE_TILINGS_GROUP_2
        else:
            by_group = _DECODE_TILINGS
        listed = _ENV_DECODE_TILING + by_group
    else:
        listed = _PREFILL_TILINGS
    tilings = [(max(m, triton.next_power_of_2(group)), *rest) for m, *rest in listed]
    fits = [t for t in tilings if _shared_bytes(t[0], t[1], t[3], d, elem_size, kv_elem_size) <= limits.shared_mem]
    return (fits or tilings[-1:])[0]


MAX_SPLITS = 32
SPLIT_COUNTS = [1 << i for i in range(MAX_SPLITS.bit_length())]  # every num_splits a launch may take


def choose_config(
    num_tokens: int,
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    elem_size: int,
    limits: DeviceLimits,
    max_seq_len: int | None = None,
    kv_elem_size: int | None = None,
    v_keys: bool = False,
) -> AttentionConfig:
    """Tiles from the shapes alone (no device sync, so a CUDA graph can capture the call).

    Decode-only batches (one token per sequence) take 16-row tiles and split the keys when
    there are too few programs to keep every SM streaming; batches with prefill chunks take
    128-row tiles, the size at which the tensor cores do the work. elem_size is q's element
    size, kv_elem_size the cache's where it differs (fp8); v_keys: the V cache is `keys_contiguous`.
    """
    group = num_heads // num_kv_heads
    block_m, tile_n, num_warps, num_stages = _tiling(
        num_tokens == num_seqs, group, head_dim, elem_size, limits, kv_elem_size, v_keys
    )
    block_q = block_m // group
    programs = (num_tokens // block_q + num_seqs) * num_kv_heads
    return AttentionConfig(block_m, tile_n, _num_splits(programs, tile_n, limits, max_seq_len), num_warps, num_stages)


def _num_splits(programs: int, tile_n: int, limits: DeviceLimits, max_seq_len: int | None) -> int:
    """Key slices a program: enough for two programs an SM, if the launch has fewer."""
    target = 2 * limits.num_sms
    if programs >= target:
        return 1
    return _useful_splits(min(MAX_SPLITS, triton.next_power_of_2(-(-target // programs))), tile_n, max_seq_len)


def _useful_splits(num_splits: int, tile_n: int, max_seq_len: int | None) -> int:
    """num_splits (a power of two), halved until each slice streams at least 4 tiles of the
    longest sequence, or the merge costs more than it saves (max_seq_len None: no bound)."""
    if max_seq_len is None:
        return num_splits
    useful = max(1, max_seq_len // (4 * tile_n))
    return min(num_splits, 1 << (useful.bit_length() - 1))


# `kernels.triton_decode_fp8`'s launch: keys a tile, warps, stages, e4m3 terms of q and of p.
# PAGODA_FP8_DECODE_TILING=tile,warps,stages,q_terms,p_terms replaces it (benchmarks).
DECODE_FP8_TILING = (_tiling_from_env("PAGODA_FP8_DECODE_TILING", "tile,warps,stages,q_terms,p_terms")
                     or [(64, 4, 2, 2, 1)])[0]


# Its register cap where the programs queue (at least DECODE_FP8_CAP_PROGRAMS_PER_SM an SM): 96 a
# thread (the uncapped build takes 119; neither spills) fits 5 programs an SM instead of 4, and
# each waits out its own tile's loads, so more of them in flight stream faster. On the H200,
# decodes longest first: T's 256 sequences 121.1 -> 115.8 us, 128 of them 63.5 -> 62.3; but 64
# (512 programs: one wave) 48.6 -> 51.4, llama's 64 x 32/8 heads 64.7 -> 69.2, hence only there.
# PAGODA_FP8_DECODE_MAXNREG sets the cap, 0 never caps (benchmarks).
DECODE_FP8_MAX_REGISTERS = int(os.environ.get("PAGODA_FP8_DECODE_MAXNREG", "96"))
DECODE_FP8_CAP_PROGRAMS_PER_SM = 6
# Its keys split in two where one wave holds every program (at most 4 an SM, the uncapped
# build's occupancy): the longest sequences' programs then set the launch's time while the other
# SMs idle. On the H200 (64-slot blocks, T's lengths longest first): 64 sequences 34.3 -> 30.7
# us, 48 of them 33.2 -> 25.8, llama's 64 x 32/8 heads 48.0 -> 44.9; 80 and 96 sequences even
# (36.6 / 36.1, 42.6 / 43.4), 128 slower (49.9 -> 58.0). Below 2 programs an SM `_num_splits`
# splits further. PAGODA_FP8_DECODE_SPLIT_PER_SM sets the bound (0: `_num_splits` alone).
DECODE_FP8_SPLIT_PROGRAMS_PER_SM = int(os.environ.get("PAGODA_FP8_DECODE_SPLIT_PER_SM", "4"))


def choose_decode_fp8_config(
    num_seqs: int, num_kv_heads: int, limits: DeviceLimits, max_seq_len: int | None = None
) -> DecodeFp8Config:
    """`choose_config`'s counterpart for the decode-only launches `triton_decode_fp8` runs."""
    tile_n, num_warps, num_stages, q_terms, p_terms = DECODE_FP8_TILING
    programs = num_seqs * num_kv_heads
    splits = _num_splits(programs, tile_n, limits, max_seq_len)
    if splits == 1 and programs <= DECODE_FP8_SPLIT_PROGRAMS_PER_SM * limits.num_sms:
        splits = _useful_splits(2, tile_n, max_seq_len)
    queued = programs * splits >= DECODE_FP8_CAP_PROGRAMS_PER_SM * limits.num_sms
    cap = DECODE_FP8_MAX_REGISTERS if queued and DECODE_FP8_MAX_REGISTERS > 0 else None
    return DecodeFp8Config(tile_n, splits, num_warps, num_stages, q_terms, p_terms, cap)


def possible_configs(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    elem_size: int,
    limits: DeviceLimits,
    kv_elem_size: int | None = None,
    v_keys: bool = False,
) -> list[AttentionConfig]:
    """Every config `choose_config` can return for one model's attention, whatever the batch."""
    group = num_heads // num_kv_heads
    configs = []
    for decode in (True, False):
        block_m, tile_n, num_warps, num_stages = _tiling(
            decode, group, head_dim, elem_size, limits, kv_elem_size, v_keys
        )
        configs += [AttentionConfig(block_m, tile_n, n, num_warps, num_stages) for n in SPLIT_COUNTS]
    return configs


def warm_up(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> int:
    """Compile, ahead of the first request, every kernel variant this model's steps can launch.

    Triton compiles a variant on its first launch (about a second each), which would
    otherwise stall the first steps that mix prefill chunks and decodes. q: [T, heads, d] with
    the strides and dtype the model's q has (not an fp8 cache's); the caches are the real ones
    (only block 0 is read).
    """
    num_tokens = q.shape[0]
    tables = torch.zeros(1, triton.cdiv(num_tokens, k_cache.shape[1]), dtype=torch.int32, device=q.device)
    seq_lens = torch.tensor([num_tokens], dtype=torch.int32, device=q.device)
    qsl = torch.tensor([0, num_tokens], dtype=torch.int32, device=q.device)
    configs = possible_configs(
        q.shape[1], k_cache.shape[2], q.shape[2], q.element_size(), device_limits(q.device), k_cache.element_size(),
        keys_contiguous(v_cache),
    )
    for config in configs:
        paged_attention_triton(q, k_cache, v_cache, tables, seq_lens, qsl, scale, config=config)
    if triton_decode_fp8.applies(q.shape[1], k_cache, v_cache):
        tile_n, num_warps, num_stages, q_terms, p_terms = DECODE_FP8_TILING
        decode_configs = [DecodeFp8Config(tile_n, n, num_warps, num_stages, q_terms, p_terms) for n in SPLIT_COUNTS]
        if DECODE_FP8_MAX_REGISTERS > 0:  # only launches in 1 or 2 slices have enough programs to be capped
            decode_configs += [replace(c, max_registers=DECODE_FP8_MAX_REGISTERS) for c in decode_configs[:2]]
        for config in decode_configs:  # one sequence of one token
            paged_attention_triton(q[:1], k_cache, v_cache, tables, seq_lens.clamp(max=1), qsl.clamp(max=1), scale,
                                   config=config)
        configs += decode_configs
    return len(configs)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    num_decodes: int = 0,
    out: torch.Tensor | None = None,
    config: AttentionConfig | DecodeFp8Config | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """`paged_attention_ref`'s function on the GPU (or on CPU tensors under TRITON_INTERPRET=1).

    max_seq_len: optional host-side bound on seq_lens; only used to split the keys less.
    num_decodes: optional; the first num_decodes sequences are known to have one query each.
        A batch mixing decodes and prefill chunks then runs as two launches, each with its
        own tiles, instead of giving every decode the 128-row tile of a prefill chunk.
    out: optional [T, num_heads, head_dim] to write into; config: tiles to use instead of
        `choose_config`'s (benchmarks; applies to every launch): an `AttentionConfig` runs the
        general kernel, a `DecodeFp8Config` the fp8 decode kernel (decode-only batches).
    k_scale, v_scale: an fp8 cache's scales (Python floats: constants in a CUDA graph); caches of
        q's dtype ignore them.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, kv_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if kv_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} kv heads")
    if (q.dtype != k_cache.dtype and not is_fp8(k_cache)) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError("seq_lens, query_start_loc and block_tables disagree on the number of sequences")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("the last dimension of q, the K cache and block_tables must be contiguous")
    if v_cache.stride(-1) != 1 and not keys_contiguous(v_cache):
        raise ValueError("the V cache must be contiguous in its head dimension or in its slots")
    if not 0 <= num_decodes <= min(num_seqs, num_tokens):
        raise ValueError(f"num_decodes {num_decodes} with {num_seqs} sequences and {num_tokens} tokens")
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if 0 < num_decodes < num_seqs:
        # Sequences [0, d) own tokens [0, d); the rest keep their absolute query_start_loc.
        d = num_decodes
        _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out,
                config, max_seq_len, k_scale, v_scale, first_seq=0, num_part_seqs=d, first_token=0,
                num_part_tokens=d)
        _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out,
                config, max_seq_len, k_scale, v_scale, first_seq=d, num_part_seqs=num_seqs - d, first_token=d,
                num_part_tokens=num_tokens - d)
    else:
        _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out,
                config, max_seq_len, k_scale, v_scale, first_seq=0, num_part_seqs=num_seqs, first_token=0,
                num_part_tokens=num_tokens)
    return out


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    config: AttentionConfig | DecodeFp8Config | None,
    max_seq_len: int | None,
    k_scale: float,
    v_scale: float,
    first_seq: int,
    num_part_seqs: int,
    first_token: int,
    num_part_tokens: int,
) -> None:
    """Attention for sequences [first_seq, + num_part_seqs), whose queries are tokens
    [first_token, + num_part_tokens)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1:3]
    num_seqs = num_part_seqs
    group = num_heads // num_kv_heads
    fp8 = is_fp8(k_cache)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    decode = num_part_tokens == num_seqs
    if isinstance(config, DecodeFp8Config) and not (decode and triton_decode_fp8.supports(num_heads, k_cache, v_cache)):
        raise ValueError("a DecodeFp8Config needs a decode-only launch over an fp8 cache with V keys-contiguous")
    if isinstance(config, DecodeFp8Config) or (
        config is None and decode and triton_decode_fp8.applies(num_heads, k_cache, v_cache)
    ):
        dcfg = config or choose_decode_fp8_config(num_seqs, num_kv_heads, device_limits(q.device), max_seq_len)
        parts = _split_partials(out, dcfg.num_splits)
        triton_decode_fp8.launch(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale * k_scale * LOG2_E, v_scale, out,
            *parts, dcfg, first_seq, num_seqs,
        )
        if dcfg.num_splits > 1:
            _reduce_splits(parts, out, first_token, num_part_tokens, head_dim_pad, dcfg.num_splits)
        return
    v_keys = keys_contiguous(v_cache)
    cfg = config or choose_config(
        num_part_tokens, num_seqs, num_heads, num_kv_heads, head_dim, q.element_size(), device_limits(q.device),
        max_seq_len, k_cache.element_size(), v_keys,
    )
    block_q = cfg.block_m // group
    if block_q < 1:
        raise ValueError(f"block_m {cfg.block_m} is smaller than the {group} query heads of a group")
    splits = cfg.num_splits
    # q blocks are numbered by absolute token (see _find_seq), hence num_tokens, not the part's.
    grid = ((num_tokens // block_q + num_seqs) * num_kv_heads, splits)
    part_out, part_lse = _split_partials(out, splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_out, part_lse,
        block_tables, seq_lens, query_start_loc,
        (scale * k_scale if fp8 else scale) * LOG2_E, v_scale, first_seq, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_Q=block_q, TILE_N=cfg.tile_n,
        V_RUN=key_run(block_size, cfg.tile_n) if v_keys else 0,
        NUM_SPLITS=splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16, KV_FP8=fp8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(q.device),
    )
    if splits > 1:
        _reduce_splits((part_out, part_lse), out, first_token, num_part_tokens, head_dim_pad, splits)


def _split_partials(out: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 partial outputs [T, heads, splits, d] and log-sum-exps [T, heads, splits] the key
    slices write; with one slice `out` twice, never touched (NUM_SPLITS == 1 writes `out`)."""
    if splits == 1:
        return out, out
    num_tokens, num_heads, head_dim = out.shape
    return (
        torch.empty(num_tokens, num_heads, splits, head_dim, dtype=torch.float32, device=out.device),
        torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=out.device),
    )


def _reduce_splits(
    parts: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, first_token: int, num_tokens: int, head_dim_pad: int,
    splits: int,
) -> None:
    """Merge the key slices' partial outputs of tokens [first_token, + num_tokens) into `out`."""
    part_out, part_lse = parts
    num_heads, head_dim = out.shape[1:]
    _reduce_splits_kernel[(num_tokens, num_heads)](
        part_out, part_lse, out, first_token, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=splits,
        num_warps=4, **pdl_kwargs(out.device),
    )


def attention_flops(q_lens: list[int], seq_lens: list[int], num_heads: int, head_dim: int) -> int:
    """Multiply-adds x 2 of QK^T and PV over the keys each query actually sees (causal)."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(q_lens, seq_lens, strict=True))
    return 4 * pairs * num_heads * head_dim


