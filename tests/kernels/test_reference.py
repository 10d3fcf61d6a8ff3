"""The plain-PyTorch kernels against dense attention written the obvious way."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from kernels import paged_attention_ref, write_kv_ref


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [q_len, heads, d] are the last q_len positions of k, v [ctx, kv_heads, d]."""
    q_len, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    query_pos = torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class PagedBatch(NamedTuple):
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    dense_kv: list[tuple[torch.Tensor, torch.Tensor]]  # each sequence's K and V, contiguous


def build_paged_batch(
    seq_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    seed: int,
) -> PagedBatch:
    """Random sequences scattered over shuffled cache blocks, plus their dense K/V."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that no sequence owns
    block_ids = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    dense_kv = []
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        table = block_ids[used : used + nb]
        used += nb
        block_tables[b, :nb] = table
        k = k_cache[table].flatten(0, 1)[:n]
        v = v_cache[table].flatten(0, 1)[:n]
        dense_kv.append((k, v))
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    query_start_loc = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return PagedBatch(q, k_cache, v_cache, block_tables, seq_lens_t, query_start_loc, dense_kv)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size"),
    [(4, 2, 16, 4), (9, 3, 64, 16), (8, 8, 32, 8), (6, 1, 8, 5)],
)
def test_paged_attention_matches_dense_for_mixed_prefill_and_decode(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> None:
    # (context, new queries): a fresh prompt, a chunk over a cached prefix, decodes of
    # several lengths, none of them a multiple of the block size.
    seqs = [(13, 13), (1, 1), (37, 9), (22, 1), (7, 1), (50, 2), (19, 19)]
    batch = build_paged_batch(
        [ctx for ctx, _ in seqs], [n for _, n in seqs], num_heads, num_kv_heads, head_dim, block_size, 0
    )
    scale = 1 / math.sqrt(head_dim)
    out = paged_attention_ref(*batch[:6], scale)
    for b, (k, v) in enumerate(batch.dense_kv):
        start, end = batch.query_start_loc[b], batch.query_start_loc[b + 1]
        expected = dense_causal_attention(batch.q[start:end], k, v, scale)
        torch.testing.assert_close(out[start:end], expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_handles_a_batch_of_only_decodes() -> None:
    batch = build_paged_batch([3, 16, 17, 40], [1, 1, 1, 1], 4, 2, 16, 16, seed=1)
    out = paged_attention_ref(*batch[:6], 0.3)
    for b, (k, v) in enumerate(batch.dense_kv):
        expected = dense_causal_attention(batch.q[b : b + 1], k, v, 0.3)
        torch.testing.assert_close(out[b : b + 1], expected, atol=1e-5, rtol=1e-5)


def test_write_kv_writes_exactly_the_mapped_slots() -> None:
    num_blocks, block_size, kv_heads, d = 6, 4, 2, 8
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, d)
    v_cache = torch.zeros(num_blocks, block_size, kv_heads, d)
    slots = torch.tensor([5, 6, 7, 8, 21, 0])
    k = torch.randn(len(slots), kv_heads, d)
    v = torch.randn(len(slots), kv_heads, d)
    write_kv_ref(k, v, k_cache, v_cache, slots)
    flat_k = k_cache.flatten(0, 1)
    flat_v = v_cache.flatten(0, 1)
    torch.testing.assert_close(flat_k[slots], k)
    torch.testing.assert_close(flat_v[slots], v)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert flat_k[untouched].eq(0).all() and flat_v[untouched].eq(0).all()
    # slot 21 is block 5, offset 1
    torch.testing.assert_close(k_cache[5, 1], k[4])
