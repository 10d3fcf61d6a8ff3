"""The W4A16 GEMV at one row, llama3-8b's projections, group 128, bf16: the default kernel's
tilings and, with docs/results/s17-int4-lean-gemv.diff applied, the lean kernel's; bf16 cuBLAS
beside. Weights cycled past L2 (copies of each) in one CUDA graph per variant
(`bench.kernels.timed_in_graph`: the median a call; session 17's figures took the best of 10).
One JSON line a projection: the six best variants and their error against the reference (max
over the output's largest value). ONLY_LEAN=1: the lean tilings and the default only."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os

import torch

from bench.kernels import timed_in_graph
from kernels.int4_linear import Int4GroupWeight, w4a16_linear_ref
from kernels.triton_int4_linear import Int4GemvConfig, gemv_config, w4a16_linear_triton

PROJECTIONS = {"o": (4096, 4096), "qkv": (4096, 6144), "gate_up": (4096, 28672), "down": (14336, 4096)}
LEAN = "lean" in {f.name for f in dataclasses.fields(Int4GemvConfig)}
ONLY_LEAN = os.environ.get("ONLY_LEAN") == "1"  # the default kernel's tilings were swept in session 17


def main() -> None:
    torch.manual_seed(0)
    for name, (k, n) in PROJECTIONS.items():
        copies = max(2, int(200e6 // (k * n // 2)))
        weights = [Int4GroupWeight.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, 128)
                   for _ in range(copies)]
        num_dense = max(2, int(400e6 // (2 * k * n)))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(num_dense)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        first = weights[0]
        ref = w4a16_linear_ref(x, first.qweight, first.scales, first.zeros).float()
        cublas = [functools.partial(torch.nn.functional.linear, x, w) for w in dense]
        row = {"projection": name, "cublas_bf16_us": round(timed_in_graph(cublas) * 1e6, 2)}
        results = []
        kinds = (True,) if LEAN and ONLY_LEAN else (False, True) if LEAN else (False,)
        configs = [Int4GemvConfig(bn, min(bk, k), warps, **({"lean": lean} if LEAN else {}))
                   for lean, bn, bk, warps in itertools.product(kinds, (4, 8, 16, 32), (512, 1024, 2048), (2, 4, 8))]
        if gemv_config(1, n, k) not in configs:
            configs.append(gemv_config(1, n, k))
        for cfg in configs:
            calls = [functools.partial(w4a16_linear_triton, x, w.qweight, w.scales, w.zeros, config=cfg)
                     for w in weights]
            try:
                out = w4a16_linear_triton(x, first.qweight, first.scales, first.zeros, config=cfg).float()
                err = round(((out - ref).abs().max() / ref.abs().max()).item(), 4)
                results.append((round(timed_in_graph(calls) * 1e6, 2), str(cfg), err))
            except Exception as e:  # a tiling that does not compile: reported, the sweep goes on
                print(json.dumps({"projection": name, "config": str(cfg), "error": str(e)[:200]}), flush=True)
        results.sort()
        default = str(gemv_config(1, n, k))
        row["default"] = [r for r in results if r[1] == default]
        row["best"] = results[:6]
        row["best_GB_s"] = round(k * n / 2 / (results[0][0] * 1e-6) / 1e9)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
