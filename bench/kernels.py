"""Workload K (docs/BENCHMARKS.md): the attention kernels against the machine and PyTorch.

    python -m bench.kernels [--sweep] [--out results.json]

Decode: paged attention over batch 64 x context 4096 (32/8 heads, d 128, block 16, bf16), as
bytes/s next to a device-to-device copy measured in the same run, and next to PyTorch's
`scaled_dot_product_attention` on contiguous K/V. Prefill: 4 x 4096 causal, as TFLOP/s next
to SDPA's flash and cuDNN backends. Every time is the median of CUDA-event timings
(`triton.testing.do_bench`, which also flushes the L2 cache before each run). `--sweep`
adds other tilings of the Triton kernel, to choose `choose_config`'s defaults from.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from kernels.kv_cache import keys_contiguous, keys_contiguous_copy, v_keys_contiguous
from kernels.triton_paged_attention import (
    AttentionConfig,
    attention_flops,
    choose_config,
    device_limits,
    paged_attention_triton,
)

DECODE = dict(batch=64, context=4096, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
PREFILL = dict(batch=4, tokens=4096, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)

DECODE_SWEEP = [
    AttentionConfig(16, tile_n, splits, warps, stages)
    for tile_n, splits, warps, stages in [
        (32, 1, 4, 5), (32, 1, 4, 4), (32, 1, 8, 5), (16, 1, 4, 5), (16, 1, 2, 5), (64, 1, 4, 3), (64, 1, 8, 5),
        (128, 1, 4, 3), (128, 1, 8, 3), (32, 2, 4, 5), (32, 1, 4, 5),
    ]
]
PREFILL_SWEEP = [
    AttentionConfig(block_m, tile_n, 1, warps, stages)
    for block_m, tile_n, warps, stages in [(128, 64, 8, 5), (128, 32, 8, 5), (128, 128, 8, 2), (128, 64, 8, 5)]
]


def timed(fn: Callable[[], Any]) -> float:
    """Seconds per call: the median of CUDA-event timings after a warm-up."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting the bytes read and the bytes written."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / timed(lambda: dst.copy_(src))


def paged_cache(
    batch: int, context: int, num_kv_heads: int, head_dim: int, block_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches holding `batch` sequences in shuffled blocks, and their block tables."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen, device="cuda").view(batch, blocks_per_seq).to(torch.int32)
    return k_cache, v_cache, tables


def shuffled_decode_batch(
    lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int = 128, block_size: int = 16
) -> tuple[torch.Tensor, ...]:
    """One decode query per sequence of `lens` keys (for the kernel sweeps in docs/results): q
    [B, heads, d] bf16, fp32 K/V caches with 8 spare blocks, block tables over a shuffle of the
    blocks (its own seed, 2), seq_lens and query_start_loc; on CUDA. q, K and V come from torch's
    global generator, in that order."""
    batch = len(lens)
    blocks = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks) + 8
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(2))
    table = torch.zeros(batch, max(blocks), dtype=torch.int32)
    start = 0
    for b, count in enumerate(blocks):
        table[b, :count] = ids[start:start + count]
        start += count
    q = (torch.randn(batch, num_heads, head_dim) * 2).to(torch.bfloat16).cuda()
    k32 = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda") * 0.5
    v32 = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    return q, k32, v32, table.cuda(), seq_lens, qsl


def new_variant_registers(kernel: Any, seen: set[int]) -> dict[str, int]:
    """n_regs and n_spills of the variant of Triton `kernel` compiled since the last call (ids in
    `seen`); {} when none was."""
    out: dict[str, int] = {}
    for cache in kernel.device_caches.values():
        for compiled in cache[0].values():
            if id(compiled) not in seen:
                seen.add(id(compiled))
                out = {"regs": compiled.n_regs, "spills": compiled.n_spills}
    return out


def _run_variants(
    configs: list[AttentionConfig], call: Callable[[AttentionConfig], Any], work: float, unit: str
) -> list[dict[str, Any]]:
    rows = []
    for cfg in configs:
        try:
            seconds = timed(lambda cfg=cfg: call(cfg))
            rows.append({"config": cfg.__dict__, "seconds": seconds, unit: work / seconds})
        except Exception as e:  # a tiling that does not fit (shared memory, registers) is a result too
            rows.append({"config": cfg.__dict__, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"  {cfg} -> {rows[-1].get(unit, rows[-1].get('error'))}", file=sys.stderr)
    return rows


def bench_decode(copy_bw: float, sweep: bool) -> dict[str, Any]:
    s = DECODE
    b, ctx, h, kvh, d = s["batch"], s["context"], s["num_heads"], s["num_kv_heads"], s["head_dim"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache, v_cache, tables = paged_cache(b, ctx, kvh, d, s["block_size"], gen)
    q = torch.randn(b, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    # The bytes that must move: every K and V row once, q read and the output written.
    nbytes = 2 * b * ctx * kvh * d * 2 + 2 * q.numel() * 2
    scale = d**-0.5

    def call(cfg: AttentionConfig | None, max_seq_len: int | None = None) -> torch.Tensor:
        return paged_attention_triton(
            q, k_cache, v_cache, tables, seq_lens, qsl, scale, out=out, config=cfg, max_seq_len=max_seq_len
        )

    default = choose_config(b, b, h, kvh, d, 2, device_limits(q.device), ctx)
    t = timed(lambda: call(None, ctx))
    result: dict[str, Any] = {"shape": s, "bytes": nbytes}
    result["triton_paged"] = {"config": default.__dict__, "seconds": t, "bytes_per_s": nbytes / t,
                              "fraction_of_copy": nbytes / t / copy_bw}

    # PyTorch on the same K/V made contiguous ([B, kv_heads, context, d]), each KV head's group
    # of query heads folded into its query rows so that K/V are read once; it must agree with ours.
    k = k_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    qg = q.view(b, kvh, h // kvh, d)
    ref = F.scaled_dot_product_attention(qg, k, v, scale=scale)
    t = timed(lambda: F.scaled_dot_product_attention(qg, k, v, scale=scale))
    result["sdpa_contiguous"] = {"seconds": t, "bytes_per_s": nbytes / t, "fraction_of_copy": nbytes / t / copy_bw}
    call(None, ctx)
    result["triton_rel_err"] = ((out.float() - ref.reshape_as(out).float()).norm() / ref.float().norm()).item()
    for name, section in (
        ("small_batches", lambda: _small_batches(q, k_cache, v_cache, tables, ctx, copy_bw, sweep)),
        ("mixed_batch", lambda: _mixed_batch(k_cache, v_cache, tables, ctx, gen)),
    ):
        try:
            result[name] = section()
        except Exception as e:  # a failed side measurement must not cost the headline figures
            result[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if sweep:
        result["variants"] = _run_variants(DECODE_SWEEP, call, nbytes, "bytes_per_s")
        # The price of paging: the same kernel with every sequence's blocks in order.
        in_order = torch.arange(tables.numel(), dtype=torch.int32, device="cuda").view_as(tables)
        t = timed(lambda: paged_attention_triton(q, k_cache, v_cache, in_order, seq_lens, qsl, scale, out=out))
        result["triton_blocks_in_order"] = {"seconds": t, "bytes_per_s": nbytes / t}
    return result


# Decode at workload T's model (qwen3-0.6b: 16/8 heads, d 128): many sequences of short, uneven
# contexts, where each program streams few tiles and a launch's fixed costs weigh more than in K.
T_DECODE_CASES = [(256, "uniform 100..1100"), (256, "600"), (128, "uniform 100..2048"), (64, "uniform 100..2048")]
T_DECODE_SWEEP = [
    AttentionConfig(16, tile_n, 1, warps, stages)
    for tile_n in (32, 64, 128) for warps in (2, 4, 8) for stages in (3, 4, 5)
] + [AttentionConfig(16, 16, 1, 4, 5), AttentionConfig(16, 16, 1, 2, 3)]
# Over an fp8 cache a tile of keys is half the bytes: wider tiles stream as much per load.
T_DECODE_FP8_SWEEP = [
    AttentionConfig(16, tile_n, 1, warps, stages)
    for tile_n in (32, 64, 128, 256) for warps in (2, 4, 8) for stages in (3, 4, 5)
]


def _contexts(spec: str, batch: int, gen: torch.Generator) -> torch.Tensor:
    if spec.startswith("uniform"):
        lo, hi = (int(x) for x in spec.split()[1].split(".."))
        return torch.randint(lo, hi + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    return torch.full((batch,), int(spec), dtype=torch.int32, device="cuda")


def bench_t_decode(copy_bw: float, sweep: bool, kv_fp8: bool = False) -> list[dict[str, Any]]:
    """Decode attention at workload T's shapes, the default config (and with --sweep every tiling
    of T_DECODE_SWEEP) as a share of the copy bandwidth; no key splits (these batches fill the GPU).
    kv_fp8: over an e4m3 cache (`--kv-cache-dtype fp8`), its bytes counted at one a value, V in
    the layout the worker binds (`kernels.kv_cache.v_keys_contiguous`)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows: list[dict[str, Any]] = []
    for batch, spec in T_DECODE_CASES:
        rows += _t_decode_case(batch, spec, copy_bw, sweep, gen, kv_fp8)
    return rows


def _t_decode_case(batch: int, spec: str, copy_bw: float, sweep: bool, gen: torch.Generator,
                   kv_fp8: bool = False) -> list[dict[str, Any]]:
    h, kvh, d, bs = 16, 8, 128, 16
    seq_lens = _contexts(spec, batch, gen)
    k_cache, v_cache, tables = paged_cache(batch, int(seq_lens.max()), kvh, d, bs, gen)
    kv_elem = 1 if kv_fp8 else 2
    if kv_fp8:
        k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
        if v_keys_contiguous(v_cache.device, v_cache.dtype):
            v_cache = keys_contiguous_copy(v_cache)
    q = torch.randn(batch, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    nbytes = 2 * int(seq_lens.sum()) * kvh * d * kv_elem + 2 * q.numel() * 2
    default = choose_config(batch, batch, h, kvh, d, 2, device_limits(q.device),
                            kv_elem_size=1 if kv_fp8 else None, v_keys=keys_contiguous(v_cache))
    swept = T_DECODE_FP8_SWEEP if kv_fp8 else T_DECODE_SWEEP
    rows = []
    for cfg in [default] + ([c for c in swept if c != default] if sweep else []):
        row: dict[str, Any] = {"batch": batch, "contexts": spec, "config": cfg.__dict__, "default": cfg == default,
                               "kv_cache_dtype": "fp8" if kv_fp8 else "bf16",
                               "v_keys_contiguous": keys_contiguous(v_cache)}
        try:
            t = timed(lambda cfg=cfg: paged_attention_triton(
                q, k_cache, v_cache, tables, seq_lens, qsl, d**-0.5, out=out, config=cfg))
            row.update(seconds=t, bytes_per_s=nbytes / t, fraction_of_copy=nbytes / t / copy_bw)
        except Exception as e:  # a tiling that does not fit is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(f"  T decode{' fp8' if kv_fp8 else ''} batch {batch} contexts {spec} {cfg} -> "
              f"{row.get('fraction_of_copy', row.get('error'))}",
              file=sys.stderr)
    return rows


def timed_in_graph(calls: list[Callable[[], Any]]) -> float:
    """Seconds per call with the calls captured in one CUDA graph, as the runner replays decode
    steps: the host's launch overhead is gone, so small launches show their GPU time."""
    for call in calls:
        call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return timed(graph.replay) / len(calls)


def _small_batches(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, ctx: int, copy_bw: float,
    sweep: bool,
) -> list[dict[str, Any]]:
    """Decode of 1..16 long sequences: what split-KV buys when batch x kv heads cannot fill the SMs.

    Each graph runs the batch over every disjoint slice of the 64 cached sequences in turn,
    so no call finds its K/V in L2 from the one before.
    """
    rows = []
    h, d = q.shape[1:]
    kvh = k_cache.shape[2]
    # With --sweep also short contexts, where a decode step's fixed costs weigh more, and the
    # config a decode CUDA graph takes (captured with no bound on the context).
    for b, context in [(b, ctx) for b in (1, 4, 16, 64)] + ([(b, 512) for b in (1, 4, 16, 64)] if sweep else []):
        seq_lens = torch.full((b,), context, dtype=torch.int32, device="cuda")
        qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        nbytes = 2 * b * context * kvh * d * 2
        auto = choose_config(b, b, h, kvh, d, 2, device_limits(q.device), context)
        in_graph = choose_config(b, b, h, kvh, d, 2, device_limits(q.device))
        configs = [auto]
        if sweep:
            configs += [replace(auto, num_splits=s) for s in (1, 2, 4, 8, 16, 32) if s != auto.num_splits]
            configs += [AttentionConfig(16, 128, s, 4, 3) for s in (auto.num_splits, 2 * auto.num_splits)]
        for cfg in configs:
            calls = [
                lambda i=i, cfg=cfg, b=b, seq_lens=seq_lens, qsl=qsl: paged_attention_triton(
                    q[i * b : (i + 1) * b], k_cache, v_cache, tables[i * b : (i + 1) * b], seq_lens, qsl, d**-0.5,
                    config=cfg)
                for i in range(min(16, tables.shape[0] // b))
            ]
            t = timed_in_graph(calls)
            rows.append({"batch": b, "context": context, "config": cfg.__dict__, "default": cfg == auto,
                         "graph_default": cfg == in_graph, "seconds": t,
                         "bytes_per_s": nbytes / t, "fraction_of_copy": nbytes / t / copy_bw})
            print(f"  batch {b} context {context} {cfg} -> {rows[-1]['fraction_of_copy']:.3f} of copy", file=sys.stderr)
    return rows


def _mixed_batch(
    k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, ctx: int, gen: torch.Generator
) -> dict[str, Any]:
    """63 decodes and one 2048-token chunk over a 2048-token prefix, in one launch or two."""
    h, d = DECODE["num_heads"], DECODE["head_dim"]
    decodes, chunk = tables.shape[0] - 1, ctx // 2
    q = torch.randn(decodes + chunk, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((decodes + 1,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.tensor([*range(decodes + 1), decodes + chunk], dtype=torch.int32, device="cuda")
    args = (q, k_cache, v_cache, tables, seq_lens, qsl, d**-0.5)
    result = {}
    for name, n in (("one_launch", 0), ("decodes_apart", decodes)):
        result[name + "_seconds"] = timed(lambda n=n: paged_attention_triton(*args, max_seq_len=ctx, num_decodes=n))
    result["decodes_alone_seconds"] = timed(lambda: paged_attention_triton(
        q[:decodes], k_cache, v_cache, tables[:decodes], seq_lens[:decodes], qsl[: decodes + 1], d**-0.5))
    return result


def bench_pointwise(copy_bw: float, t: int = 4096) -> dict[str, Any]:
    """The small kernels at a 4096-token prefill of llama3-8b's shapes: bytes/s against PyTorch eager."""
    from kernels import apply_rotary_ref, fused_add_rms_norm_ref, silu_and_mul_ref, write_kv_ref
    from kernels.triton_activation import silu_and_mul_triton
    from kernels.triton_kv_cache import write_kv_triton
    from kernels.triton_norm import fused_add_rms_norm_triton
    from kernels.triton_rotary import apply_rotary_triton

    gen = torch.Generator(device="cuda").manual_seed(2)
    hidden, inter, h, kvh, d = 4096, 14336, 32, 8, 128

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    x, res, w = rand(t, hidden), rand(t, hidden), rand(hidden)
    gate_up = rand(t, 2 * inter)
    qkv = rand(t, (h + 2 * kvh) * d)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
    cos, sin = rand(t, d, dtype=torch.float32), rand(t, d, dtype=torch.float32)
    num_blocks = -(-2 * t // 16)  # the new tokens land on random slots of a cache twice their size
    caches = [rand(num_blocks, 16, kvh, d) for _ in range(2)]
    slots = torch.randperm(num_blocks * 16, generator=gen, device="cuda")[:t]
    cases = {
        "fused_add_rms_norm": (4 * t * hidden * 2, lambda: fused_add_rms_norm_triton(x, res, w, 1e-5),
                               lambda: fused_add_rms_norm_ref(x, res, w, 1e-5)),
        "silu_and_mul": (3 * t * inter * 2, lambda: silu_and_mul_triton(gate_up), lambda: silu_and_mul_ref(gate_up)),
        "rotary_q": (2 * t * h * d * 2 + 2 * t * d * 4, lambda: apply_rotary_triton(q, cos, sin),
                     lambda: apply_rotary_ref(q, cos, sin)),
        "write_kv": (4 * t * kvh * d * 2, lambda: write_kv_triton(k, k, *caches, slots),
                     lambda: write_kv_ref(k, k, *caches, slots)),
    }
    result = {}
    for name, (nbytes, fast, ref) in cases.items():
        tf, tr = timed(fast), timed(ref)
        result[name] = {"bytes": nbytes, "triton_seconds": tf, "torch_seconds": tr,
                        "triton_fraction_of_copy": nbytes / tf / copy_bw}
    return result


# The decoder's projections at the batch sizes the benchmarks decode at: llama3-8b one stream
# (workload L) and qwen3-0.6b at 16 and 256 sequences (workload T). (name, in, out).
GEMM_SHAPES = {
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                  ("lm_head", 4096, 128256)],
    "qwen3-0.6b": [("qkv", 1024, 4096), ("o", 2048, 1024), ("gate_up", 1024, 6144), ("down", 3072, 1024),
                   ("lm_head", 1024, 151936)],
}
GEMM_BATCHES = {"llama3-8b": (1,), "qwen3-0.6b": (16, 256)}


SKINNY_SWEEP = [(bn, bk, 4, st) for bn in (16, 32) for bk in (128, 256, 512) for st in (3, 4, 6)]


def bench_gemm(copy_bw: float, sweep: bool = False) -> list[dict[str, Any]]:
    """cuBLAS on the decode projections, replayed in a CUDA graph over enough different weights
    (>= 256 MB) that none is read from L2, as the model's layers are: `F.linear(x, W)` on the
    [out, in] weight the model keeps, and `x @ Wt` on an [in, out] copy, as the share of the
    copy bandwidth the bytes moved reach, to see which layout cuBLAS serves better here."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    return [_gemm_case(model, name, m, k, n, copy_bw, gen, sweep)
            for model, shapes in GEMM_SHAPES.items() for m in GEMM_BATCHES[model] for name, k, n in shapes]


def _gemm_case(model: str, name: str, m: int, k: int, n: int, copy_bw: float, gen: torch.Generator,
               sweep: bool) -> dict[str, Any]:
    from kernels.triton_linear import MAX_ROWS, LinearConfig, default_config, linear_skinny_triton

    copies = min(64, max(2, -(-(256 << 20) // (n * k * 2))))
    ws = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    nbytes = (n * k + m * k + m * n) * 2
    row: dict[str, Any] = {"model": model, "name": name, "m": m, "k": k, "n": n, "bytes": nbytes, "copies": copies}
    t = timed_in_graph([lambda w=w: F.linear(x, w) for w in ws])
    row.update(linear_seconds=t, linear_fraction_of_copy=nbytes / t / copy_bw)
    if m <= MAX_ROWS:
        # Ours (kernels/triton_linear.py) on the same weights, checked against cuBLAS.
        ref = F.linear(x, ws[0]).float()
        err = ((linear_skinny_triton(x, ws[0]).float() - ref).norm() / ref.norm()).item()
        default = default_config(n, k)
        swept = [LinearConfig(*spec) for spec in SKINNY_SWEEP] if sweep else []
        configs = [default] + [c for c in swept if c != default]
        variants = []
        for cfg in configs:
            try:
                t = timed_in_graph([lambda w=w, cfg=cfg: linear_skinny_triton(x, w, config=cfg) for w in ws])
                variants.append({"config": cfg.__dict__, "seconds": t, "fraction_of_copy": nbytes / t / copy_bw})
            except Exception as e:  # a config that does not fit is a result too
                variants.append({"config": cfg.__dict__, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        row.update(triton_seconds=variants[0].get("seconds"), triton_fraction_of_copy=variants[0].get(
            "fraction_of_copy"), triton_rel_err=err, triton_variants=variants)
    wts = [w.t().contiguous() for w in ws]
    del ws
    t = timed_in_graph([lambda wt=wt: x @ wt for wt in wts])
    row.update(mm_transposed_seconds=t, mm_transposed_fraction_of_copy=nbytes / t / copy_bw)
    print(f"  gemm {model} {name} m={m}: linear {row['linear_fraction_of_copy']:.3f}, "
          f"x @ Wt {row['mm_transposed_fraction_of_copy']:.3f}, triton {row.get('triton_fraction_of_copy')} of copy",
          file=sys.stderr)
    return row


# The one-row FP8 GEMV's tilings swept with --sweep: (rows, keys, warps, unroll, vec); vec 16 is
# the kernel that sums each thread's 16 keys every step (`_gemv_fp8_vec_kernel`).
FP8_GEMV_SWEEP = [(bn, bk, w, u, 0) for bn in (2, 4, 8) for bk in (512, 1024, 2048) for w in (2, 4, 8) for u in (1, 2)
                  if bn * bk // (32 * w) >= 8] + [
    (bn, bk, w, 1, 16) for bn in (2, 4, 8) for bk in (512, 1024, 2048) for w in (1, 2, 4) if bn * bk // (32 * w) >= 16]


def bench_fp8_gemv(copy_bw: float, sweep: bool = False) -> list[dict[str, Any]]:
    """The FP8 one-row GEMV (kernels/triton_fp8_linear.py, batch-1 decode with `--quantization
    fp8`) at llama3-8b's projections: weights cycled through >= 512 MB so none is read from L2,
    consecutive launches in one CUDA graph, with programmatic dependent launch (kernels/pdl.py)
    off and on (the default tiling), and with --sweep every tiling of FP8_GEMV_SWEEP (PDL as
    the machine has it). Each checked against `w8a16_linear_ref`."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    return [_fp8_gemv_case(name, k, n, copy_bw, gen, sweep) for name, k, n in GEMM_SHAPES["llama3-8b"][:4]]


def _fp8_gemv_case(name: str, k: int, n: int, copy_bw: float, gen: torch.Generator, sweep: bool) -> dict[str, Any]:
    import kernels.pdl as pdl
    from kernels.fp8_linear import quantize_weight, w8a16_linear_ref
    from kernels.triton_fp8_linear import GemvConfig, fp8_linear_skinny_triton, gemv_fp8_config

    copies = max(2, -(-(512 << 20) // (n * k)))
    ws = []
    for _ in range(copies):
        w, scale = quantize_weight(torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) / 64)
        ws.append((w, scale.reshape(-1).float().contiguous()))
    x = torch.randn(1, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    ref = w8a16_linear_ref(x, *ws[0]).float()
    nbytes = n * k + 2 * (k + n)

    def timing(cfg: GemvConfig) -> dict[str, Any]:
        try:
            err = ((fp8_linear_skinny_triton(x, *ws[0], config=cfg).float() - ref).norm() / ref.norm()).item()
            t = timed_in_graph([lambda w=w, s=s: fp8_linear_skinny_triton(x, w, s, config=cfg) for w, s in ws])
            return {"config": cfg.__dict__, "seconds": t, "fraction_of_copy": nbytes / t / copy_bw, "rel_err": err}
        except Exception as e:  # a tiling that does not compile is a result too
            return {"config": cfg.__dict__, "error": f"{type(e).__name__}: {str(e)[:200]}"}

    default = gemv_fp8_config(n, k)
    row: dict[str, Any] = {"name": name, "k": k, "n": n, "bytes": nbytes, "copies": copies}
    env = pdl._ENV
    try:
        for setting in ("0", "1"):
            pdl._ENV = setting
            row[f"pdl_{setting}"] = timing(default)
    finally:
        pdl._ENV = env
    if sweep:
        variants = [timing(GemvConfig(*spec)) for spec in FP8_GEMV_SWEEP]
        row["variants"] = sorted(variants, key=lambda v: v.get("seconds", float("inf")))
    best = row.get("variants", [{}])[0]
    print(f"  fp8 gemv {name}: default {row['pdl_0'].get('seconds', 0) * 1e6:.1f} us without PDL, "
          f"{row['pdl_1'].get('seconds', 0) * 1e6:.1f} with; best {best.get('config')} "
          f"{best.get('seconds', 0) * 1e6:.1f} us", file=sys.stderr)
    return row


def bench_prefill(sweep: bool) -> dict[str, Any]:
    s = PREFILL
    b, n, h, kvh, d = s["batch"], s["tokens"], s["num_heads"], s["num_kv_heads"], s["head_dim"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    k_cache, v_cache, tables = paged_cache(b, n, kvh, d, s["block_size"], gen)
    q = torch.randn(b * n, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    qsl = torch.arange(0, b * n + 1, n, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    flops = attention_flops([n] * b, [n] * b, h, d)
    scale = d**-0.5

    def call(cfg: AttentionConfig | None) -> torch.Tensor:
        return paged_attention_triton(q, k_cache, v_cache, tables, seq_lens, qsl, scale, out=out, config=cfg)

    default = choose_config(b * n, b, h, kvh, d, 2, device_limits(q.device), n)
    t = timed(lambda: call(None))
    result: dict[str, Any] = {"shape": s, "flops": flops}
    result["triton_paged"] = {"config": default.__dict__, "seconds": t, "flops_per_s": flops / t}

    # The same K/V made contiguous for SDPA ([B, heads, tokens, d]); it must agree with ours.
    k = k_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    qs = q.view(b, n, h, d).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                try:
                    F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=True)
                    kk, vv, gqa = k, v, True
                except RuntimeError:  # a backend without GQA gets K/V repeated per query head
                    kk, vv, gqa = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1), False
                ref = F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa)
                t = timed(lambda kk=kk, vv=vv, gqa=gqa: F.scaled_dot_product_attention(
                    qs, kk, vv, is_causal=True, scale=scale, enable_gqa=gqa))
            call(None)
            err = ((out.float() - ref.transpose(1, 2).reshape_as(out).float()).norm() / ref.float().norm()).item()
            result[name] = {"seconds": t, "flops_per_s": flops / t, "kv_repeated": not gqa, "triton_rel_err": err}
        except RuntimeError as e:
            result[name] = {"error": str(e)[:300]}
    if sweep:
        result["variants"] = _run_variants(PREFILL_SWEEP, call, flops, "flops_per_s")
    return result


def bench_argmax(copy_bw: float) -> list[dict[str, Any]]:
    """Greedy argmax over llama3-8b's 128,256 bf16 logits at 1..256 rows: torch's reduction
    against kernels/triton_argmax.py, each call replayed in a CUDA graph as the engine's decode
    steps run (timed one call at a time from Python, host launch costs dominate at these sizes),
    checked equal to torch's."""
    from kernels.triton_argmax import argmax_rows_triton

    gen = torch.Generator(device="cuda").manual_seed(5)
    rows = []
    for n in (1, 4, 16, 64, 256):
        x = torch.randn(n, 128256, generator=gen, device="cuda", dtype=torch.bfloat16)
        if not torch.equal(argmax_rows_triton(x), x.argmax(dim=-1)):
            raise AssertionError(f"argmax_rows_triton differs from torch at {n} rows")
        t_torch = timed_in_graph([lambda x=x: x.argmax(dim=-1)])
        t_triton = timed_in_graph([lambda x=x: argmax_rows_triton(x)])
        rows.append({"rows": n, "torch_seconds": t_torch, "triton_seconds": t_triton,
                     "triton_fraction_of_copy": x.numel() * 2 / t_triton / copy_bw})
        print(f"  argmax rows {n}: torch {t_torch * 1e6:.1f} us, triton {t_triton * 1e6:.1f} us", file=sys.stderr)
    return rows


SECTIONS = ("decode", "t_decode", "t_decode_fp8", "prefill", "pointwise", "gemm", "fp8_gemv", "argmax")


def run(sweep: bool = False, only: Sequence[str] = SECTIONS) -> dict[str, Any]:
    from bench.hardware import describe

    copy_bw = copy_bandwidth()
    result: dict[str, Any] = {"workload": "K", "machine": describe("cuda"), "copy_bandwidth_bytes_per_s": copy_bw}
    if "decode" in only:
        result["decode"] = bench_decode(copy_bw, sweep)
    if "t_decode" in only:
        result["t_decode"] = bench_t_decode(copy_bw, sweep)
    if "t_decode_fp8" in only:
        result["t_decode_fp8"] = bench_t_decode(copy_bw, sweep, kv_fp8=True)
    if "prefill" in only:
        result["prefill"] = bench_prefill(sweep)
    if "pointwise" in only:
        result["pointwise"] = bench_pointwise(copy_bw)
    if "gemm" in only:
        result["gemm"] = bench_gemm(copy_bw, sweep)
    if "fp8_gemv" in only:
        result["fp8_gemv"] = bench_fp8_gemv(copy_bw, sweep)
    if "argmax" in only:
        result["argmax"] = bench_argmax(copy_bw)
    return result


def summary(r: dict[str, Any]) -> str:
    dec, pre = r.get("decode", {}), r.get("prefill", {})
    lines = [f"copy bandwidth {r['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s"]
    for name in ("triton_paged", "sdpa_contiguous"):
        if name not in dec:
            continue
        x = dec[name]
        lines.append(f"decode  {name:16s} {x['seconds'] * 1e6:8.1f} us  {x['bytes_per_s'] / 1e12:.2f} TB/s "
                     f"({100 * x['fraction_of_copy']:.1f}% of copy)")
    for row in dec.get("small_batches", []):
        if row["default"]:
            lines.append(f"decode  batch {row['batch']:2d} context {row['context']} in a graph, splits "
                         f"{row['config']['num_splits']:2d} {row['seconds'] * 1e6:7.1f} us  "
                         f"{100 * row['fraction_of_copy']:.1f}% of copy")
    if "mixed_batch" in dec:
        ms = {k: v * 1e3 for k, v in dec["mixed_batch"].items()}
        lines.append(f"mixed   63 decodes + 2048 chunk: one launch {ms['one_launch_seconds']:.3f} ms, decodes apart "
                     f"{ms['decodes_apart_seconds']:.3f} ms (decodes alone {ms['decodes_alone_seconds']:.3f})")
    for name, x in r.get("pointwise", {}).items():
        share = 100 * x["triton_fraction_of_copy"]
        lines.append(f"{name:20s} triton {x['triton_seconds'] * 1e6:7.1f} us ({share:.0f}% of copy), "
                     f"torch {x['torch_seconds'] * 1e6:7.1f} us")
    for row in r.get("t_decode", []) + r.get("t_decode_fp8", []):
        if row["default"] and "seconds" in row:
            lines.append(f"T decode {row['kv_cache_dtype']} batch {row['batch']:3d} contexts {row['contexts']:18s} "
                         f"{row['seconds'] * 1e6:7.1f} us  {100 * row['fraction_of_copy']:.1f}% of copy")
    for row in r.get("gemm", []):
        lines.append(f"gemm {row['model']:10s} {row['name']:8s} m={row['m']:<3d} F.linear "
                     f"{row['linear_seconds'] * 1e6:7.1f} us ({100 * row['linear_fraction_of_copy']:.0f}% of copy), "
                     f"x @ Wt {row['mm_transposed_seconds'] * 1e6:7.1f} us"
                     + (f", triton {row['triton_seconds'] * 1e6:7.1f} us" if row.get("triton_seconds") else ""))
    for row in r.get("fp8_gemv", []):
        off, on = row["pdl_0"], row["pdl_1"]
        best = (row.get("variants") or [{}])[0]
        lines.append(f"fp8 gemv {row['name']:8s} PDL off {off.get('seconds', 0) * 1e6:6.1f} us, on "
                     f"{on.get('seconds', 0) * 1e6:6.1f} us ({100 * on.get('fraction_of_copy', 0):.0f}% of copy)"
                     + (f"; best {best['config']} {best['seconds'] * 1e6:6.1f} us" if "seconds" in best else ""))
    for row in r.get("argmax", []):
        lines.append(f"argmax {row['rows']:3d} rows x 128256: torch {row['torch_seconds'] * 1e6:6.1f} us, "
                     f"triton {row['triton_seconds'] * 1e6:6.1f} us")
    for name in ("triton_paged", "sdpa_flash", "sdpa_cudnn") if pre else ():
        x = pre.get(name, {})
        if "seconds" in x:
            lines.append(f"prefill {name:16s} {x['seconds'] * 1e3:8.3f} ms  {x['flops_per_s'] / 1e12:.0f} TFLOP/s")
        else:
            lines.append(f"prefill {name:16s} {x.get('error', 'not run')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time other tilings of the Triton kernel")
    parser.add_argument("--out", help="write the JSON here as well as to stdout")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("workload K needs a CUDA GPU")
    only = args.only.split(",")
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    result = run(args.sweep, only)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    print(summary(result))


if __name__ == "__main__":
    main()
