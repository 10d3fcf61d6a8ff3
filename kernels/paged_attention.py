"""Paged attention: attention over keys and values stored in fixed-size cache blocks.

One varlen function serves a prefill chunk over a cached prefix and a decode step alike: a
sequence's queries are its last `q_len` positions of `seq_len`, and query i attends to keys
0 .. seq_len - q_len + i (causal, aligned to the end).

An fp8 cache (kernels/kv_cache.py) is read back in q's dtype, k_scale folded into the softmax
scale and v_scale applied to the output (1.0: neither); 16/32-bit caches ignore the scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.kv_cache import as_bytes, is_fp8


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q: [T, num_heads, head_dim], the queries of B sequences laid end to end.
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], already holding this
        step's keys and values.
    block_tables: [B, max_blocks] int32; entries past a sequence's last block may hold any
        valid block id.
    seq_lens: [B], each sequence's context length including this step's tokens.
    query_start_loc: [B + 1], sequence b's queries are q[query_start_loc[b]:query_start_loc[b+1]].
    k_scale, v_scale: an fp8 cache's scales (ignored for other dtypes).
    Returns [T, num_heads, head_dim].
    """
    out = torch.empty_like(q)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    # Decodes (one query each) are batched into one padded attention call; prefill chunks,
    # few and long, are done one sequence at a time.
    decode = torch.nonzero(q_lens == 1).flatten()
    if decode.numel() > 0:
        rows = query_start_loc[decode]
        context = decode_context(block_tables[decode], seq_lens[decode], k_cache.shape[1])
        out[rows] = decode_attention(q[rows], k_cache, v_cache, context, scale, k_scale=k_scale, v_scale=v_scale)
    for b in torch.nonzero(q_lens > 1).flatten().tolist():
        start, end = query_start_loc[b].item(), query_start_loc[b + 1].item()
        out[start:end] = _prefill_attention(
            q[start:end], k_cache, v_cache, block_tables[b], int(seq_lens[b]), scale, k_scale, v_scale
        )
    return out


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` cached rows of each table: [B, num_kv_heads, num_tokens, head_dim]
    (an fp8 cache's as uint8: see `_dequantize`)."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    blocks = as_bytes(cache)[block_tables[:, :num_blocks].long()]  # [B, n, block_size, kv_heads, d]
    tokens = blocks.flatten(1, 2)[:, :num_tokens]
    return tokens.transpose(1, 2)


def _gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Cache rows [len(slots), num_kv_heads, d] at flat slots (block * block_size + offset)."""
    cache = as_bytes(cache)
    if cache.is_contiguous():
        return cache.view(-1, *cache.shape[2:]).index_select(0, slots)
    block_size = cache.shape[1]
    return cache[slots // block_size, slots % block_size]


def _dequantize(gathered: torch.Tensor, cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows gathered from `cache` in `dtype`: an fp8 cache's (gathered as uint8, since PyTorch's
    CPU gathers and scatters do not all take float8) reinterpreted and widened, exactly (every
    e4m3 value is a bf16, fp16 and fp32 value); any other cache's as they are."""
    if not is_fp8(cache):
        return gathered
    return gathered.view(cache.dtype).to(dtype)


def _group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, q_len, heads, d] -> [B, kv_heads, group * q_len, d].

    Query head h reads kv head h // group, so folding a kv head's group of query heads into
    the query rows lets GQA run without copying keys and values once per query head.
    """
    b, q_len, num_heads, d = q.shape
    group = num_heads // num_kv_heads
    return q.view(b, q_len, num_kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(b, num_kv_heads, group * q_len, d)


def _ungroup_queries(o: torch.Tensor, q_len: int) -> torch.Tensor:
    """Inverse of `_group_queries`: [B, kv_heads, group * q_len, d] -> [B, q_len, heads, d]."""
    b, num_kv_heads, rows, d = o.shape
    group = rows // q_len
    return o.view(b, num_kv_heads, group, q_len, d).permute(0, 3, 1, 2, 4).reshape(b, q_len, num_kv_heads * group, d)


def decode_context(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where a batch of decodes finds its context, shared by every layer of a step: the cache
    slots [B, L] of each sequence's first L positions (L the longest context; a shorter one's
    extra slots point into blocks its table pads with) and the mask [B, 1, 1, L] of the real
    ones (None when every sequence has L)."""
    max_len = int(seq_lens.max())
    pos = torch.arange(max_len, device=seq_lens.device)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size
    if bool((seq_lens == max_len).all()):
        return slots, None
    return slots, (pos[None, :] < seq_lens[:, None])[:, None, None, :]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor | None],
    scale: float,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query per sequence over the context `decode_context` found: [B, heads, d] -> [B, heads, d].

    Query head h reads KV head h // group, so a KV head's group of query heads attends as one
    block of rows (no K/V copied per query head). k_scale, v_scale: an fp8 cache's scales.
    """
    slots, mask = context
    b, num_heads, d = q.shape
    num_kv_heads = k_cache.shape[2]
    flat = slots.flatten()
    k, v = (_gather_slots(cache, flat).view(b, -1, num_kv_heads, d) for cache in (k_cache, v_cache))
    k, v = _dequantize(k, k_cache, q.dtype), _dequantize(v, v_cache, q.dtype)
    fp8 = is_fp8(k_cache)
    # SDPA rather than matmul-softmax-matmul: a row's numbers then do not depend on how far the
    # batch's longest context pads it (greedy tokens the same alone and in any batch).
    o = F.scaled_dot_product_attention(
        q.reshape(b, num_kv_heads, -1, d), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=scale * k_scale if fp8 else scale,
    )
    if fp8 and v_scale != 1.0:
        o = o * v_scale
    return o.reshape(b, num_heads, d)


def _prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
    k_scale: float,
    v_scale: float,
) -> torch.Tensor:
    """The last q_len positions of one sequence: [q_len, heads, d] -> [q_len, heads, d]."""
    q_len = q.shape[0]
    num_kv_heads = k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    k = _dequantize(_gather_kv(k_cache, block_table[None], seq_len), k_cache, q.dtype)
    v = _dequantize(_gather_kv(v_cache, block_table[None], seq_len), v_cache, q.dtype)
    fp8 = is_fp8(k_cache)
    query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    causal = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
    o = F.scaled_dot_product_attention(
        _group_queries(q[None], num_kv_heads), k, v, attn_mask=causal.repeat(group, 1),
        scale=scale * k_scale if fp8 else scale,
    )
    if fp8 and v_scale != 1.0:
        o = o * v_scale
    return _ungroup_queries(o, q_len)[0]
