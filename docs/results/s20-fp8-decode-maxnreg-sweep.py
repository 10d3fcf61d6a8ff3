"""Session 20 call 2: the fp8 decode kernel, longest-first order, register caps (maxnreg) x stages,
and split counts for smaller batches.

    PYTHONPATH=. python3 docs/results/s20-fp8-decode-maxnreg-sweep.py \
        > docs/results/s20-h200-fp8-decode-maxnreg-call2.jsonl
"""
import json

import torch

import kernels.triton_decode_fp8 as d8
from bench.kernels import new_variant_registers, shuffled_decode_batch, timed_in_graph
from kernels.kv_cache import keys_contiguous_copy
from kernels.paged_attention import paged_attention_ref
from kernels.triton_decode_fp8 import DecodeFp8Config as C
from kernels.triton_paged_attention import paged_attention_triton

D, BS = 128, 16
SEEN = set()
KERNEL = d8._decode_fp8_kernel


class Capped:
    def __init__(self, extra): self.extra = extra
    def __getitem__(self, grid):
        f = KERNEL[grid]
        return lambda *a, **kw: f(*a, **kw, **self.extra)


def case(name, heads, kvh, lens, variants):
    torch.manual_seed(0)
    q, k32, v32, tables, seq_lens, qsl = shuffled_decode_batch(lens, heads, kvh, D, BS)
    batch = len(lens)
    kc, vc = k32.to(torch.float8_e4m3fn), v32.to(torch.float8_e4m3fn)
    v = keys_contiguous_copy(vc)
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, qsl, D**-0.5)
    kv_bytes = sum(lens) * kvh * D * 2
    for label, cfg, maxnreg in variants:
        d8._decode_fp8_kernel = Capped({"maxnreg": maxnreg}) if maxnreg else KERNEL
        def run(cfg=cfg):
            return paged_attention_triton(q, kc, v, tables, seq_lens, qsl, D**-0.5, config=cfg,
                                          num_decodes=batch, max_seq_len=max(lens))
        row = {"case": name, "kernel": label, "maxnreg": maxnreg, "config": cfg and cfg.__dict__}
        try:
            out = run().float()
            row["rel_err"] = round(((out - ref).norm() / ref.norm()).item(), 5)
            us = timed_in_graph([run] * 20) * 1e6
            row.update(us=round(us, 2), tb_s=round(kv_bytes / us / 1e6, 2), **new_variant_registers(KERNEL, SEEN))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
    d8._decode_fp8_kernel = KERNEL


def main():
    gen = torch.Generator().manual_seed(1)
    t = [int(x) for x in torch.randint(100, 1101, (256,), generator=gen)]
    vs = [("default", None, None)]
    for stages in (2, 3, 4):
        for cap in (None, 128, 96, 80):
            if stages == 2 and cap is None:
                continue
            vs.append((f"s{stages}", C(64, 1, 4, stages, 2, 1), cap))
    vs.append(("1,1 cap96", C(64, 1, 4, 2, 1, 1), 96))
    case("T-desc", 16, 8, sorted(t, reverse=True), vs)
    short = [("default", None, None), ("s2 cap96", C(64, 1, 4, 2, 2, 1), 96), ("s3 cap96", C(64, 1, 4, 3, 2, 1), 96)]
    for b in (128, 64, 32):
        sub = sorted(t[:b], reverse=True)
        case(f"T{b}-desc", 16, 8, sub, short + [(f"split{s}", C(64, s, 4, 2, 2, 1), None) for s in (2, 4)])
    l64 = sorted([int(x) for x in torch.randint(500, 1500, (64,), generator=gen)], reverse=True)
    case("L64-desc", 32, 8, l64, short + [("split2", C(64, 2, 4, 2, 2, 1), None)])

main()
