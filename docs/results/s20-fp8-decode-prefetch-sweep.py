"""Session 20 call 3: the register-prefetch variant of the fp8 decode kernel
(docs/results/s20-fp8-decode-prefetch-kernel.py) against the default, T's shape longest first.

    PYTHONPATH=. python3 docs/results/s20-fp8-decode-prefetch-sweep.py \
        > docs/results/s20-h200-fp8-decode-prefetch-call3.jsonl
"""
import json
import sys

sys.path.insert(0, "docs/results")
import torch

d8pre = __import__("s20-fp8-decode-prefetch-kernel")
import kernels.triton_decode_fp8 as d8  # noqa: E402
from bench.kernels import new_variant_registers, shuffled_decode_batch, timed_in_graph  # noqa: E402
from kernels.kv_cache import key_run, keys_contiguous_copy  # noqa: E402
from kernels.paged_attention import paged_attention_ref  # noqa: E402
from kernels.pdl import pdl_kwargs  # noqa: E402
from kernels.triton_paged_attention import LOG2_E, paged_attention_triton  # noqa: E402

D, BS = 128, 16
SEEN = set()


def pf_launch(q, kc, vc, tables, seq_lens, qsl, scale, out, warps, stages, q_terms, p_terms, cap):
    heads, d = q.shape[1:]
    bs, kvh = kc.shape[1:3]
    extra = {"maxnreg": cap} if cap else {}
    d8pre._decode_fp8_pf_kernel[(q.shape[0] * kvh, 1)](
        q, kc, vc, out, out, out, tables, seq_lens, qsl, scale * LOG2_E, 1.0, 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(2), vc.stride(3), tables.stride(0),
        NUM_HEADS=heads, GROUP=heads // kvh, GROUP_PAD=16, HEAD_DIM=d, BLOCK_SIZE=bs, TILE_N=64, NUM_SPLITS=1,
        V_RUN=key_run(bs, 64), Q_TERMS=q_terms, P_TERMS=p_terms, UPCAST=False,
        num_warps=warps, num_stages=stages, **pdl_kwargs(q.device), **extra)
    return out


def case(name, heads, kvh, lens):
    torch.manual_seed(0)
    q, k32, v32, tables, seq_lens, qsl = shuffled_decode_batch(lens, heads, kvh, D, BS)
    batch = len(lens)
    kc, vc = k32.to(torch.float8_e4m3fn), v32.to(torch.float8_e4m3fn)
    v = keys_contiguous_copy(vc)
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, qsl, D**-0.5)
    kv_bytes = sum(lens) * kvh * D * 2
    out = torch.empty_like(q)
    variants = [("default", None)]
    for stages in (1, 2):
        for cap in (0, 168, 128):
            variants.append((f"pf s{stages} cap{cap}", (4, stages, 2, 1, cap)))
    variants.append(("pf 1,1 cap168", (4, 1, 1, 1, 168)))
    for label, pf in variants:
        if pf is None:
            def run():
                return paged_attention_triton(q, kc, v, tables, seq_lens, qsl, D**-0.5, num_decodes=batch,
                                              max_seq_len=max(lens))
        else:
            def run(pf=pf):
                return pf_launch(q, kc, v, tables, seq_lens, qsl, D**-0.5, out, *pf)
        row = {"case": name, "kernel": label}
        try:
            o = run().float()
            row["rel_err"] = round(((o - ref).norm() / ref.norm()).item(), 5)
            us = timed_in_graph([run] * 20) * 1e6
            regs = new_variant_registers(d8pre._decode_fp8_pf_kernel, SEEN)
            regs = regs or new_variant_registers(d8._decode_fp8_kernel, SEEN)
            row.update(us=round(us, 2), tb_s=round(kv_bytes / us / 1e6, 2), **regs)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)


gen = torch.Generator().manual_seed(1)
t = [int(x) for x in torch.randint(100, 1101, (256,), generator=gen)]
case("T-desc", 16, 8, sorted(t, reverse=True))
case("T128-desc", 16, 8, sorted(t[:128], reverse=True))
l64 = sorted([int(x) for x in torch.randint(500, 1500, (64,), generator=gen)], reverse=True)
case("L64-desc", 32, 8, l64)
