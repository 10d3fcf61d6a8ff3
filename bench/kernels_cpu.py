"""Workload K at small shapes on the CPU, through the PyTorch references (CI and laptops).

The same figures as bench/kernels.py (decode bytes/s against the copy bandwidth, prefill
FLOP/s against SDPA), so the JSON has one shape whatever the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kernels import paged_attention_ref


def _seconds(fn: Callable[[], Any], repeat: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def run_cpu(copy_bw: float, batch: int = 4, context: int = 256, heads: int = 8, kv_heads: int = 2,
            d: int = 64, block: int = 16) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = context // block
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block, kv_heads, d, generator=gen)
    v_cache = torch.randn(num_blocks, block, kv_heads, d, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, d, generator=gen)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
    t_dec = _seconds(lambda: paged_attention_ref(q, k_cache, v_cache, tables, seq_lens, qsl, d**-0.5))
    kc, vc = k_cache.view(batch, context, kv_heads, d).transpose(1, 2), v_cache.view(batch, context, kv_heads, d)
    vc = vc.transpose(1, 2)
    t_sdpa = _seconds(lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True))
    qp = torch.randn(context, heads, d, generator=gen)
    one = torch.tensor([0, context], dtype=torch.int32)
    flops = 4 * heads * d * context * (context + 1) / 2
    t_pre = _seconds(lambda: paged_attention_ref(qp, k_cache, v_cache, tables[:1], seq_lens[:1], one, d**-0.5))
    t_pre_sdpa = _seconds(lambda: F.scaled_dot_product_attention(
        qp.transpose(0, 1)[None], kc[:1], vc[:1], is_causal=True, enable_gqa=True))
    return {
        "device": "cpu",
        "decode": {"shape": dict(batch=batch, context=context, num_heads=heads, num_kv_heads=kv_heads,
                                 head_dim=d, block_size=block),
                   "seconds": t_dec, "bytes_per_s": kv_bytes / t_dec, "fraction_of_copy": kv_bytes / t_dec / copy_bw,
                   "sdpa_contiguous_bytes_per_s": kv_bytes / t_sdpa},
        "prefill": {"tokens": context, "seconds": t_pre, "flops_per_s": flops / t_pre,
                    "sdpa_flops_per_s": flops / t_pre_sdpa},
    }
