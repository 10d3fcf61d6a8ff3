"""Session 21 call 1: the fp8 decode kernel at T's shapes over 16-, 32- and 64-slot blocks; with a
64-slot block a 64-key tile is one block, and its id can be loaded two tiles ahead (prefetch).
Ran at 1553b16 with `_tile_blocks` and a `prefetch` field of DecodeFp8Config (dropped since), so
the prefetch rows need that variant (docs/BENCHMARKS.md, twenty-first session)."""
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

def case(name, heads, kvh, lens, bs):
    torch.manual_seed(0)
    q, k32, v32, tables, seq_lens, qsl = shuffled_decode_batch(lens, heads, kvh, D, bs)
    batch = len(lens)
    lim = tpa.device_limits(q.device)
    dflt = tpa.choose_decode_fp8_config(batch, kvh, lim, max(lens))
    for dname, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        kc, vc = k32.to(dtype), v32.to(dtype)
        v = keys_contiguous_copy(vc) if dname == "fp8" else vc
        ref = paged_attention_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, qsl, D**-0.5)
        kv_bytes = sum(lens) * kvh * D * 2 * kc.element_size()
        if dname == "bf16":
            variants = [("default", None)] if bs in (16, 64) else []
        else:
            variants = [("default", dflt), ("prefetch", replace(dflt, prefetch=True)),
                        ("uncapped", replace(dflt, max_registers=None)),
                        ("prefetch-uncapped", replace(dflt, prefetch=True, max_registers=None))]
            variants += [("split2-cap96", replace(dflt, num_splits=2, max_registers=96)),
                         ("split2-cap96-pf", replace(dflt, num_splits=2, max_registers=96, prefetch=True)),
                         ("split4-cap96", replace(dflt, num_splits=4, max_registers=96))]
            if batch <= 64:
                variants.append(("split2", replace(dflt, num_splits=2, max_registers=None)))
        for label, cfg in variants:
            def run(cfg=cfg, v=v, kc=kc):
                return paged_attention_triton(q, kc, v, tables, seq_lens, qsl, D**-0.5, config=cfg,
                                              num_decodes=batch, max_seq_len=max(lens))
            row = {"case": name, "bs": bs, "dtype": dname, "kernel": label}
            try:
                out = run().float()
                row["rel_err"] = round(((out - ref).norm() / ref.norm()).item(), 5)
                us = timed_in_graph([run] * 20) * 1e6
                row.update(us=round(us, 2), tb_s=round(kv_bytes / us / 1e6, 2), **regs())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)

gen = torch.Generator().manual_seed(1)
t = [int(x) for x in torch.randint(100, 1101, (256,), generator=gen)]
for bs in (16, 64):
    case("T-desc", 16, 8, sorted(t, reverse=True), bs)
    case("T192-desc", 16, 8, sorted(t[:192], reverse=True), bs)
    case("T128-desc", 16, 8, sorted(t[:128], reverse=True), bs)
    case("T64-desc", 16, 8, sorted(t[:64], reverse=True), bs)
case("T-desc", 16, 8, sorted(t, reverse=True), 32)
l64 = sorted([int(x) for x in torch.randint(500, 1500, (64,), generator=gen)], reverse=True)
for bs in (16, 64):
    case("L64-desc", 32, 8, l64, bs)

# A prefill step of T: 8192 new tokens in prompts of 100..1024 (keys = their own tokens), bf16 vs fp8 caches.
def prefill_case(name, heads, kvh, lens, bs):
    torch.manual_seed(0)
    _, k32, v32, tables, seq_lens, _ = shuffled_decode_batch(lens, heads, kvh, D, bs)
    total = sum(lens)
    q = (torch.randn(total, heads, D, device="cuda") * 2).to(torch.bfloat16)
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
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
            row.update(us=round(us, 2), tb_s=round(flops / us / 1e6, 1), **regs())  # tb_s here: TFLOP/s
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)

pl, acc = [], 0
for n in t:
    if acc + n > 8192:
        break
    pl.append(n)
    acc += n
for bs in (16, 64):
    prefill_case(f"T-prefill{len(pl)}", 16, 8, pl, bs)
