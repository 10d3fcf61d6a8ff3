"""Session 20: is T's decode attention bound by the tail of uneven sequences? Same total keys in
four orders (random, longest first, shortest first, all equal), bf16 / fp8 general / fp8 products
at several tilings and splits.

    PYTHONPATH=. python3 docs/results/s20-decode-order-sweep.py > docs/results/s20-h200-decode-order-sweep-call1.jsonl
"""
import json

import torch

import kernels.triton_decode_fp8 as d8
import kernels.triton_paged_attention as tpa
from bench.kernels import new_variant_registers, shuffled_decode_batch, timed_in_graph
from kernels.kv_cache import keys_contiguous_copy
from kernels.paged_attention import paged_attention_ref
from kernels.triton_decode_fp8 import DecodeFp8Config as C
from kernels.triton_paged_attention import paged_attention_triton

D, BS = 128, 16
SEEN = set()

def regs():
    new = new_variant_registers(d8._decode_fp8_kernel, SEEN)
    return new or new_variant_registers(tpa._paged_attention_kernel, SEEN)

def case(name, heads, kvh, lens, variants, bf16=True):
    torch.manual_seed(0)
    q, k32, v32, tables, seq_lens, qsl = shuffled_decode_batch(lens, heads, kvh, D, BS)
    batch = len(lens)
    for dname, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        if dname == "bf16" and not bf16:
            continue
        kc, vc = k32.to(dtype), v32.to(dtype)
        v = keys_contiguous_copy(vc) if dname == "fp8" else vc
        ref = paged_attention_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, qsl, D**-0.5)
        kv_bytes = sum(lens) * kvh * D * 2 * kc.element_size()
        for label, cfg in (variants if dname == "fp8" else [("default", None)]):
            if label == "general":
                cfg = tpa.choose_config(batch, batch, heads, kvh, D, 2, tpa.device_limits(q.device), max(lens), 1, True)
            def run(cfg=cfg, v=v, kc=kc):
                return paged_attention_triton(q, kc, v, tables, seq_lens, qsl, D**-0.5, config=cfg,
                                              num_decodes=batch, max_seq_len=max(lens))
            row = {"case": name, "dtype": dname, "kernel": label, "config": cfg and cfg.__dict__}
            try:
                out = run().float()
                row["rel_err"] = round(((out - ref).norm() / ref.norm()).item(), 5)
                us = timed_in_graph([run] * 20) * 1e6
                row.update(us=round(us, 2), tb_s=round(kv_bytes / us / 1e6, 2), **regs())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)

def main():
    gen = torch.Generator().manual_seed(1)
    t = [int(x) for x in torch.randint(100, 1101, (256,), generator=gen)]
    orders = {"rand": t, "desc": sorted(t, reverse=True), "asc": sorted(t), "equal": [sum(t) // 256] * 256}
    full = [("general", None), ("default", None)]
    full += [(f"{c}", C(*c[:1], 1, *c[1:])) for c in [(64, 4, 2, 1, 1), (64, 4, 3, 2, 1), (64, 4, 4, 2, 1),
                                                     (128, 4, 2, 2, 1), (128, 8, 2, 2, 1), (128, 8, 3, 2, 1)]]
    full += [("split2", C(64, 2, 4, 2, 2, 1)), ("split4", C(64, 4, 4, 2, 2, 1))]
    for oname, lens in orders.items():
        case(f"T-{oname}", 16, 8, lens, full if oname in ("rand", "desc") else full[:2] + full[-2:])
    # T's batch at other sizes (the engine's batch shrinks at the end)
    for b in (128, 64):
        case(f"T{b}-rand", 16, 8, t[:b], full[:2] + full[-2:])
        case(f"T{b}-desc", 16, 8, sorted(t[:b], reverse=True), full[:2] + full[-2:])

main()
