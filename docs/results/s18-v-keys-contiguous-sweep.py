"""Decode attention (the tensor-core varlen kernel) over a V cache stored [block, head, d, slot]
(keys contiguous, `kernels.kv_cache.keys_contiguous`; "vt") against V stored d-contiguous
("std"), at T's and llama3-8b's shapes, bf16 and fp8 caches, several tilings: max error against
fp32 attention, time of 20 launches in one CUDA graph (`bench.kernels.timed_in_graph`, the median
a launch), registers. One JSON line a variant (docs/results/s18-h200-v-keys-contiguous-sweep.jsonl).

    PYTHONPATH=. python3 docs/results/s18-v-keys-contiguous-sweep.py
"""
import itertools
import json

import torch

import kernels.triton_paged_attention as tpa
from bench.kernels import new_variant_registers, shuffled_decode_batch, timed_in_graph
from kernels.kv_cache import keys_contiguous_copy
from kernels.paged_attention import paged_attention_ref
from kernels.triton_paged_attention import AttentionConfig, paged_attention_triton

D, BS = 128, 16
SEEN = set()

def regs():
    return new_variant_registers(tpa._paged_attention_kernel, SEEN)

def case(name, heads, kv_heads, lens, tilings, splits=(1,)):
    batch = len(lens)
    q, k32, v32, tables, seq_lens, qsl = shuffled_decode_batch(lens, heads, kv_heads, D, BS)
    for dname, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        kc = k32.to(dtype)
        vc = v32.to(dtype)
        vt = keys_contiguous_copy(vc)
        assert vt.stride(1) == 1 and torch.equal(vt.float(), vc.float())
        ref = paged_attention_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, qsl, D**-0.5)
        kv_bytes = sum(lens) * kv_heads * D * 2 * kc.element_size()
        for (m, n, w, st), sp, layout in itertools.product(tilings, splits, ("std", "vt")):
            v = vt if layout == "vt" else vc
            cfg = AttentionConfig(m, n, sp, w, st)
            def run(cfg=cfg, v=v, kc=kc):
                return paged_attention_triton(q, kc, v, tables, seq_lens, qsl, D**-0.5, config=cfg,
                                              num_decodes=batch, max_seq_len=max(lens))
            row = {"case": name, "dtype": dname, "layout": layout, "tiling": [m, n, w, st], "splits": sp}
            try:
                err = (run().float() - ref).abs().max().item()
                us = timed_in_graph([run] * 20) * 1e6
                row.update(us=round(us, 2), tb_s=round(kv_bytes / us / 1e6, 2), err=round(err, 4), **regs())
            except Exception as e:
                row["error"] = str(e)[:200]
            print(json.dumps(row), flush=True)

def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    t_lens = [int(x) for x in torch.randint(100, 1101, (256,), generator=gen)]
    tt = [(16, 64, 4, 5), (16, 32, 4, 5), (16, 64, 8, 5), (16, 128, 8, 5), (16, 64, 4, 3), (16, 64, 8, 3),
          (16, 32, 2, 5), (16, 64, 2, 5), (16, 128, 4, 4)]
    case("T", 16, 8, t_lens, tt)
    l64 = [int(x) for x in torch.randint(500, 1500, (64,), generator=gen)]
    case("L64", 32, 8, l64, [(16, 32, 4, 5), (16, 64, 4, 5), (16, 64, 8, 5)])
    case("L1-768", 32, 8, [768], [(16, 32, 4, 5), (16, 16, 4, 5)], splits=(4, 8, 16))

if __name__ == "__main__":
    main()
