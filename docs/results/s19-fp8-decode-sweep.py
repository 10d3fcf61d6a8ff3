"""Decode attention over an fp8 cache (V keys-contiguous, what the GPU worker binds): the general
tensor-core kernel at its default tiling against `kernels.triton_decode_fp8` (fp8 products, keys as
the rows) at several tilings and with one or two e4m3 terms for q and p; bf16 cache as the
baseline. T's shape (qwen3-0.6b, 256 sequences of 100..1100 keys) and llama3-8b's (64 sequences of
500..1500; one of 768 with split keys). Error against fp32 attention over the same (dequantized)
cache, relative (norm) and max; time of 20 launches in one CUDA graph (`bench.kernels.timed_in_graph`,
a launch); registers. One JSON line a variant (docs/results/s19-h200-fp8-decode-sweep.jsonl).

    PYTHONPATH=. python3 docs/results/s19-fp8-decode-sweep.py
"""
import json

import torch

import kernels.triton_decode_fp8 as d8
import kernels.triton_paged_attention as tpa
from bench.kernels import new_variant_registers, shuffled_decode_batch, timed_in_graph
from kernels.kv_cache import keys_contiguous_copy
from kernels.paged_attention import paged_attention_ref
from kernels.triton_decode_fp8 import DecodeFp8Config
from kernels.triton_paged_attention import paged_attention_triton

D, BS = 128, 16
SEEN: set[int] = set()


def regs():
    new = new_variant_registers(d8._decode_fp8_kernel, SEEN)
    return new or new_variant_registers(tpa._paged_attention_kernel, SEEN)


def case(name, heads, kv_heads, lens, variants):
    q, k32, v32, tables, seq_lens, qsl = shuffled_decode_batch(lens, heads, kv_heads, D, BS)
    batch = len(lens)
    for dname, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        kc, vc = k32.to(dtype), v32.to(dtype)
        v = keys_contiguous_copy(vc) if dname == "fp8" else vc
        ref = paged_attention_ref(q.float(), kc.float(), vc.float(), tables, seq_lens, qsl, D**-0.5)
        kv_bytes = sum(lens) * kv_heads * D * 2 * kc.element_size()
        for label, cfg in variants if dname == "fp8" else [("default", None)]:
            if dname == "fp8" and label == "default":
                cfg = tpa.choose_config(batch, batch, heads, kv_heads, D, 2, tpa.device_limits(q.device),
                                        max(lens), 1, True)

            def run(cfg=cfg, v=v, kc=kc):
                return paged_attention_triton(q, kc, v, tables, seq_lens, qsl, D**-0.5, config=cfg,
                                              num_decodes=batch, max_seq_len=max(lens))
            row = {"case": name, "dtype": dname, "kernel": label, "config": cfg and cfg.__dict__}
            try:
                out = run().float()
                row["rel_err"] = round(((out - ref).norm() / ref.norm()).item(), 6)
                row["max_err"] = round((out - ref).abs().max().item(), 4)
                us = timed_in_graph([run] * 20) * 1e6
                row.update(us=round(us, 2), tb_s=round(kv_bytes / us / 1e6, 2), **regs())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)


def fp8_variants(splits=1):
    out = [("default", None)]
    tilings = [(64, 4, stages, *terms) for stages in (2, 5) for terms in ((1, 1), (2, 1), (2, 2))]
    tilings += [(64, 4, 6, 2, 2), (64, 4, 7, 2, 2), (64, 4, 6, 2, 1)]
    for tile, warps, stages, q_terms, p_terms in tilings:
        out.append(("fp8dot", DecodeFp8Config(tile, splits, warps, stages, q_terms, p_terms)))
    return out


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    t_lens = [int(x) for x in torch.randint(100, 1101, (256,), generator=gen)]
    case("T", 16, 8, t_lens, fp8_variants())
    l64 = [int(x) for x in torch.randint(500, 1500, (64,), generator=gen)]
    case("L64", 32, 8, l64, fp8_variants())
    for sp in (8,):
        case(f"L1-768-s{sp}", 32, 8, [768], [("default", None)] + [
            ("fp8dot", DecodeFp8Config(64, sp, 4, stages, 2, 2)) for stages in (2, 5, 6)])


if __name__ == "__main__":
    main()
