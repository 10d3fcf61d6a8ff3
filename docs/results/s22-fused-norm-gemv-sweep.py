# ruff: noqa: B023, E501, E701, E702, F821  (a one-off record of what ran on the H200, kept as it ran)
"""Session 22: the fused norm GEMV's tilings against norm kernel + plain GEMV, 32 distinct weights chained in
one CUDA graph (PDL on), llama3-8b's qkv and gate_up; the residual GEMV against the plain one at o and down."""
import json

import torch

from kernels import fused_add_rms_norm
from kernels.fp8_linear import Fp8Weight
from kernels.triton_fp8_linear import GemvConfig, fp8_gemv_fused_triton, fp8_linear_skinny_triton


def timed(fn, reps=20, rounds=5):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    res = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps): g.replay()
        b.record(); torch.cuda.synchronize()
        res.append(a.elapsed_time(b) * 1e3 / reps / 32)
    return sorted(res)[len(res) // 2]

dev = "cuda"
L = 32
out = {}
for proj, (n, k), kind in (("qkv", (6144, 4096), "norm"), ("gate_up", (28672, 4096), "norm"),
                           ("o", (4096, 4096), "res"), ("down", (4096, 14336), "res")):
    ws = [Fp8Weight.quantize(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02) for _ in range(L)]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    r = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    g = torch.ones(k, device=dev, dtype=torch.bfloat16)
    rn = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
    row = {}
    if kind == "norm":
        def base():
            for w in ws:
                h, _ = fused_add_rms_norm(x, r, g, 1e-5)
                fp8_linear_skinny_triton(h, w.weight, w.scale)
        row["norm+gemv"] = timed(base)
        def plain():
            for w in ws:
                fp8_linear_skinny_triton(x, w.weight, w.scale)
        row["gemv"] = timed(plain)
        cfgs = [None, GemvConfig(4, 512, 2, 2), GemvConfig(8, 512, 2, 2), GemvConfig(8, 512, 4, 2), GemvConfig(8, 1024, 4),
                GemvConfig(16, 512, 4, 2), GemvConfig(2, 1024, 2, vec=16), GemvConfig(4, 1024, 2, vec=16),
                GemvConfig(4, 1024, 4, vec=16), GemvConfig(8, 1024, 4, vec=16), GemvConfig(8, 512, 2, vec=16),
                GemvConfig(4, 512, 1, vec=16), GemvConfig(4, 2048, 4, vec=16)]
        for cfg in cfgs:
            def fused(cfg=cfg):
                for w in ws:
                    fp8_gemv_fused_triton(x, w.weight, w.scale, None, g, 1e-5, None, config=cfg)
            try:
                row[f"fused {cfg}"] = timed(fused)
            except Exception as e:
                row[f"fused {cfg}"] = str(e)[:80]
            def plaincfg(cfg=cfg):
                for w in ws:
                    fp8_gemv_fused_triton(x, w.weight, w.scale, None, None, 0.0, None, config=cfg)
            if cfg is not None:
                row[f"plain {cfg}"] = timed(plaincfg)
    else:
        def plain():
            for w in ws:
                fp8_linear_skinny_triton(x, w.weight, w.scale)
        def res():
            for w in ws:
                fp8_gemv_fused_triton(x, w.weight, w.scale, None, None, 0.0, rn)
        row["gemv"] = timed(plain)
        row["gemv+res"] = timed(res)
    for key, v in row.items():
        print(proj, key, v if isinstance(v, str) else round(v, 2), flush=True)
    out[proj] = row
    del ws
    torch.cuda.empty_cache()
print(json.dumps(out))
