"""Session 21 call 2: the fp8 decode kernel at 32/64/128-slot blocks over T's batch as it shrinks
(default launch, 2 and 4 key slices capped at 96 registers), llama's 64 x 32/8; T's prefill step
over bf16 and fp8 caches at 16 and 64 slots."""
import json
from dataclasses import replace

import torch

import kernels.triton_decode_fp8 as d8
import kernels.triton_paged_attention as tpa
from bench.kernels import new_variant_registers, shuffled_decode_batch, timed_in_graph
from kernels.kv_cache import keys_contiguous_copy
from kernels.paged_attention import paged_attention_ref
from kernels.triton_paged_attention import paged_attention_triton

D = 128
SEEN = set()

def regs():
    kernels = (d8._decode_fp8_kernel, tpa._paged_attention_kernel)
    return new_variant_registers(kernels[0], SEEN) or new_variant_registers(kernels[1], SEEN)

def case(name, heads, kvh, lens, bs, splits=True, bf16=False):
    torch.manual_seed(0)
    q, k32, v32, tables, seq_lens, qsl = shuffled_decode_batch(lens, heads, kvh, D, bs)
    batch = len(lens)
    dflt = tpa.choose_decode_fp8_config(batch, kvh, tpa.device_limits(q.device), max(lens))
    for dname, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        if dname == "bf16" and not bf16:
            continue
        kc, vc = k32.to(dtype), v32.to(dtype)
        v = keys_contiguous_copy(vc) if dname == "fp8" else vc
        ref = paged_attention_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, qsl, D**-0.5)
        kv_bytes = sum(lens) * kvh * D * 2 * kc.element_size()
        variants = [("default", None)]
        if dname == "fp8" and splits:
            variants += [("split1-cap96", replace(dflt, num_splits=1, max_registers=96)),
                         ("split1-nocap", replace(dflt, num_splits=1, max_registers=None)),
                         ("split2-cap96", replace(dflt, num_splits=2, max_registers=96)),
                         ("split4-cap96", replace(dflt, num_splits=4, max_registers=96))]
        for label, cfg in variants:
            def run(cfg=cfg, v=v, kc=kc):
                return paged_attention_triton(q, kc, v, tables, seq_lens, qsl, D**-0.5, config=cfg,
                                              num_decodes=batch, max_seq_len=max(lens))
            row = {"case": name, "bs": bs, "dtype": dname, "kernel": label,
                   "cfg": None if dname == "bf16" else [c.num_splits, c.max_registers] if (c := cfg or dflt) else None}
            try:
                out = run().float()
                row["rel_err"] = round(((out - ref).norm() / ref.norm()).item(), 5)
                us = timed_in_graph([run] * 20) * 1e6
                row.update(us=round(us, 2), tb_s=round(kv_bytes / us / 1e6, 2), **regs())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)

def prefill_case(name, heads, kvh, lens, bs):
    torch.manual_seed(0)
    _, k32, v32, tables, seq_lens, _ = shuffled_decode_batch(lens, heads, kvh, D, bs)
    total = sum(lens)
    q = (torch.randn(total, heads, D, device="cuda") * 2).to(torch.bfloat16)
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    flops = sum(4 * n * (n + 1) / 2 * heads * D for n in lens)
    for dname, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        kc, vc = k32.to(dtype), v32.to(dtype)
        v = keys_contiguous_copy(vc) if dname == "fp8" else vc
        def run(v=v, kc=kc):
            return paged_attention_triton(q, kc, v, tables, seq_lens, qsl, D**-0.5, max_seq_len=max(lens))
        row = {"case": name, "bs": bs, "dtype": dname, "kernel": "prefill"}
        try:
            run()
            us = timed_in_graph([run] * 5) * 1e6
            row.update(us=round(us, 2), tflop_s=round(flops / us / 1e6, 1), **regs())
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)

gen = torch.Generator().manual_seed(1)
t = [int(x) for x in torch.randint(100, 1101, (256,), generator=gen)]
l64 = sorted([int(x) for x in torch.randint(500, 1500, (64,), generator=gen)], reverse=True)


def desc(n):
    return sorted(t[:n], reverse=True)


case("T-desc", 16, 8, desc(256), 64, bf16=True)
case("T-desc", 16, 8, desc(256), 16, splits=False, bf16=True)
for bs in (32, 128):
    case("T-desc", 16, 8, desc(256), bs, splits=False)
for n in (192, 128, 96, 80, 64, 48, 32):
    case(f"T{n}-desc", 16, 8, desc(n), 64)
case("T-rand", 16, 8, t, 64, splits=False)
case("L64-desc", 32, 8, l64, 64)
case("L64-desc", 32, 8, l64, 16, splits=False)
pl, acc = [], 0
for n in t:
    if acc + n > 8192:
        break
    pl.append(n)
    acc += n
for bs in (16, 64):
    prefill_case(f"T-prefill{len(pl)}", 16, 8, pl, bs)
