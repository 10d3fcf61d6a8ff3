"""Experiment (session 20): the fp8 decode kernel with its full tiles' K/V loaded one tile ahead
into registers (plain loads, no cp.async pipelining: num_stages 1), block ids two tiles ahead."""
import triton
import triton.language as tl

from kernels.pdl import pdl_begin
from kernels.triton_decode_fp8 import TERM_LO, _decode_tile, _dot8, _split_e4m3
from kernels.triton_kv_cache import _FP8_MAX


@triton.jit
def _ids(table_ptr, tile, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    return tl.load(table_ptr + (tile * TILE_N + tl.arange(0, TILE_N)) // BLOCK_SIZE).to(tl.int64)


@triton.jit
def _kv(block, k_cache_ptr, v_cache_ptr, kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vh, stride_vd,
        dims, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, V_RUN: tl.constexpr):
    in_block = tl.arange(0, TILE_N) % BLOCK_SIZE
    k_ptrs = k_cache_ptr + (block * stride_kb + in_block * stride_ks + kv_head * stride_kh)[:, None] + dims[None, :]
    v_off = (block * stride_vb + in_block + kv_head * stride_vh)[None, :] + dims[:, None] * stride_vd
    v_ptrs = v_cache_ptr + tl.max_contiguous(tl.multiple_of(v_off, [1, V_RUN]), [1, V_RUN])
    return tl.load(k_ptrs), tl.load(v_ptrs)


@triton.jit
def _fold(qt, qt_lo, col_scale, acc, acc_lo, l_i, m_i, k, vt, E4M3: tl.constexpr,
          Q_TERMS: tl.constexpr, P_TERMS: tl.constexpr, UPCAST: tl.constexpr):
    if Q_TERMS == 2:
        st = _dot8(k, qt, _dot8(k, qt_lo, None, UPCAST) * TERM_LO, UPCAST)
    else:
        st = _dot8(k, qt, None, UPCAST)
    st = st * col_scale[None, :]
    m_new = tl.maximum(m_i, tl.max(st, 0))
    p = tl.math.exp2(st - m_new[None, :])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha[None, :] + p
    p_hi, p_lo = _split_e4m3(p, E4M3, P_TERMS, UPCAST)
    acc = _dot8(vt, p_hi, acc * alpha[None, :], UPCAST)
    if P_TERMS == 2:
        acc_lo = _dot8(vt, p_lo, acc_lo * alpha[None, :], UPCAST)
    return acc, acc_lo, l_i, m_new


@triton.jit(do_not_specialize=["first_seq", "stride_bt"])
def _decode_fp8_pf_kernel(
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
    seq = tl.program_id(0) // num_kv_heads
    kv_head = tl.program_id(0) % num_kv_heads
    split = tl.program_id(1)
    seq += first_seq
    token = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    cols = tl.arange(0, GROUP_PAD)
    col_ok = cols < GROUP
    head = kv_head * GROUP + cols
    dims = tl.arange(0, HEAD_DIM)
    qt = tl.load(q_ptr + token * stride_qt + head[None, :] * stride_qh + dims[:, None], mask=col_ok[None, :],
                 other=0.0).to(tl.float32)
    q_scale = tl.maximum(tl.max(tl.abs(qt), 0), 1e-30) / _FP8_MAX
    E4M3: tl.constexpr = k_cache_ptr.dtype.element_ty
    qt, qt_lo = _split_e4m3(qt / q_scale[None, :], E4M3, Q_TERMS, UPCAST)
    col_scale = q_scale * qk_scale
    num_tiles = tl.cdiv(seq_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    num_full = seq_len // TILE_N
    full_hi = tl.minimum(tile_hi, num_full)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_N, GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM, GROUP_PAD], dtype=tl.float32)
    acc_lo = tl.zeros([HEAD_DIM, GROUP_PAD], dtype=tl.float32)
    if tile_lo < full_hi:
        last = full_hi - 1
        k_n, v_n = _kv(_ids(table_ptr, tile_lo, TILE_N, BLOCK_SIZE), k_cache_ptr, v_cache_ptr, kv_head,
                       stride_kb, stride_ks, stride_kh, stride_vb, stride_vh, stride_vd, dims,
                       TILE_N, BLOCK_SIZE, V_RUN)
        ids_n = _ids(table_ptr, tl.minimum(tile_lo + 1, last), TILE_N, BLOCK_SIZE)
        for tile in range(tile_lo, full_hi):
            k = k_n
            vt = v_n
            k_n, v_n = _kv(ids_n, k_cache_ptr, v_cache_ptr, kv_head, stride_kb, stride_ks, stride_kh,
                           stride_vb, stride_vh, stride_vd, dims, TILE_N, BLOCK_SIZE, V_RUN)
            ids_n = _ids(table_ptr, tl.minimum(tile + 2, last), TILE_N, BLOCK_SIZE)
            acc, acc_lo, l_i, m_i = _fold(qt, qt_lo, col_scale, acc, acc_lo, l_i, m_i, k, vt, E4M3,
                                          Q_TERMS, P_TERMS, UPCAST)
    for tile in range(tl.maximum(tile_lo, num_full), tile_hi):
        acc, acc_lo, l_i, m_i = _decode_tile(
            qt, qt_lo, col_scale, acc, acc_lo, l_i, m_i, tile, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, seq_len,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vh, stride_vd, dims,
            TILE_N, BLOCK_SIZE, True, V_RUN, Q_TERMS, P_TERMS, UPCAST,
        )
    l_i = tl.maximum(tl.sum(l_i, 0), 1.0)
    if P_TERMS == 2:
        acc += acc_lo * TERM_LO
    out = acc / l_i[None, :] * v_scale
    store_ok = col_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token * stride_ot + head[None, :] * stride_oh + dims[:, None],
                 out.to(out_ptr.dtype.element_ty), mask=store_ok)
    else:
        part_row = (token * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part_row[None, :] * HEAD_DIM + dims[:, None], out, mask=store_ok)
        tl.store(part_lse_ptr + part_row, m_i + tl.math.log2(l_i), mask=col_ok)
