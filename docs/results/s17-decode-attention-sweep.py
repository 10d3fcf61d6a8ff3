"""The CUDA-core decode attention kernel (docs/results/s17-decode-attention-kernel.diff, applied
first) against the tensor-core varlen kernel: T's shape (256 sequences of 100..1100 keys, 16/8
heads) and llama3-8b's (32/8) at batch 64 and 1; bf16 and fp8 caches. Each variant: max error
against fp32 attention, time of 20 launches in one CUDA graph (`bench.kernels.timed_in_graph`:
the median a launch; session 17's figures took the best of 10 replays), registers.
One JSON line a variant, then the six best of each case. CASES=T,L64,L1 narrows the cases."""

from __future__ import annotations

import collections
import itertools
import json
import os

import torch

import kernels.triton_paged_attention as tpa
from bench.kernels import new_variant_registers, shuffled_decode_batch, timed_in_graph
from kernels.paged_attention import paged_attention_ref
from kernels.triton_paged_attention import AttentionConfig, paged_attention_triton

D, BS = 128, 16
SEEN: set[int] = set()


def registers() -> dict:
    """n_regs and n_spills of the decode kernel variant compiled last."""
    return new_variant_registers(tpa._decode_attention_kernel, SEEN)


Variant = tuple[int, int, int, int]  # warps, keys a thread holds, values of d a thread loads, splits


def case(name: str, heads: int, kv_heads: int, lens: list[int], variants: list[Variant]) -> list[dict]:
    batch = len(lens)
    q, k32, v32, tables, seq_lens, qsl = shuffled_decode_batch(lens, heads, kv_heads, D, BS)
    rows = []
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        k_cache, v_cache = k32.to(dtype), v32.to(dtype)
        ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, qsl, D**-0.5)
        kv_bytes = sum(lens) * kv_heads * D * 2 * k_cache.element_size()
        for variant in [None, *variants]:
            config, label = None, "tensor cores (default)"
            if variant is not None:
                warps, keys_per_thread, dim_vec, splits = variant
                lanes = 32 * dim_vec // D * warps
                config = AttentionConfig(
                    16, lanes * keys_per_thread, splits, warps, 1, key_lanes=lanes, dim_vec=dim_vec
                )
                label = f"decode kernel: warps {warps}, keys/thread {keys_per_thread}, vec {dim_vec}, splits {splits}"

            def run(config=config, k_cache=k_cache, v_cache=v_cache):
                return paged_attention_triton(q, k_cache, v_cache, tables, seq_lens, qsl, D**-0.5, config=config,
                                              num_decodes=batch, max_seq_len=max(lens))

            row = {"case": name, "dtype": dtype_name, "variant": label}
            try:
                err = (run().float() - ref).abs().max().item()
                us = timed_in_graph([run] * 20) * 1e6
            except Exception as e:  # a tiling that does not compile: reported, the sweep goes on
                row["error"] = str(e)[:300]
            else:
                row.update(us=round(us, 2), tb_s=round(kv_bytes / us / 1e6, 2), err=round(err, 4))
                if variant is not None:
                    row.update(registers())
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    which = os.environ.get("CASES", "T,L64,L1")
    rows = []
    if "T" in which:
        t_lens = [int(x) for x in torch.randint(100, 1101, (256,), generator=gen)]
        grid = [(w, n, v, 1) for v, w, n in itertools.product((8, 16), (2, 4, 8), (1, 2))]
        rows += case("T", 16, 8, t_lens, grid + [(4, 1, 16, 2), (8, 1, 8, 2)])
    if "L64" in which:
        l64 = [int(x) for x in torch.randint(500, 1500, (64,), generator=gen)]
        rows += case("L64", 32, 8, l64, [(w, n, v, 1) for v, w, n in itertools.product((4, 8), (2, 4), (1, 2))])
    if "L1" in which:
        l1 = [(w, n, v, s) for (w, n, v) in ((1, 1, 4), (2, 1, 4), (2, 1, 8), (4, 1, 8), (2, 2, 8)) for s in (16, 32)]
        rows += case("L1-600", 32, 8, [600], l1) + case("L1-768", 32, 8, [768], l1)
    by_case = collections.defaultdict(list)
    for row in rows:
        if "us" in row:
            by_case[(row["case"], row["dtype"])].append(row)
    for key, found in by_case.items():
        best = sorted(found, key=lambda r: r["us"])[:6]
        print(key, "; ".join(f'{r["variant"]}: {r["us"]} us' for r in best))


if __name__ == "__main__":
    main()
