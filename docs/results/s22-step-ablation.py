# ruff: noqa: B023, E501, E701, E702, F821  (a one-off record of what ran on the H200, kept as it ran)
"""Session 22: where a batch-1 decode step's time goes under PDL, by leaving pieces out.

llama3-8b shape, weights made at load, one sequence at context CTX, the step (forward, LM head,
argmax) captured in one CUDA graph and replayed back to back. Each ablation replaces a piece
of the layer by a view (so its kernels vanish); the step's time difference is what that piece
costs on the critical path with PDL's overlap. Numbers are wrong, timing is what counts.

    PYTHONPATH=. python3 .bench/s22_ablate.py [runs...]   # runs: fp8kv fp8 bf16
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys

import torch

import kernels.pdl as pdl
from bench.shapes import make_random_model
from gpu_worker import layers
from gpu_worker.attention import Attention, AttentionMetadata
from gpu_worker.model_runner import ModelRunner
from gpu_worker.models import llama
from kernels import argmax_rows
from protocol.config import EngineConfig

CTX = int(os.environ.get("CTX", "640"))
SHAPE = os.environ.get("SHAPE", "llama3-8b")
DEV = os.environ.get("DEV", "cuda")
MAXLEN = int(os.environ.get("MAXLEN", "8192"))


@contextlib.contextmanager
def patched(names: set[str]):
    saved = []

    def put(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    if "attn" in names:
        put(Attention, "_attend", lambda self, q, meta: q)
    if "rope" in names:
        put(Attention, "_norm_rope_write_kv", lambda self, qkv, cos, sin, slots: qkv[:, : self.num_heads * self.head_dim].view(-1, self.num_heads, self.head_dim))
    if "norm" in names:
        put(layers.RMSNorm, "add_and_norm", lambda self, x, r: (x, r))
        put(layers.RMSNorm, "forward", lambda self, x: x)
    if "silu" in names:
        put(llama, "silu_and_mul", lambda x: x[:, : x.shape[-1] // 2])
    if "nopreload" in names:
        import kernels.triton_paged_attention as tpa
        put(tpa, "DECODE_FP8_PRELOAD_PROGRAMS_PER_SM", 0)
    if "unfused" in names:
        import kernels.fp8_linear as f8
        put(f8, "_FUSED_GEMV", "0")
    if "nopdl" in names:
        put(pdl, "_ENV", "0")
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def time_graph(fn, reps: int = 300, rounds: int = 5) -> float:
    if DEV != "cuda":
        import time
        fn()
        t = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - t) / 3 * 1e6
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(50):
        g.replay()
    torch.cuda.synchronize()
    res = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        res.append(a.elapsed_time(b) * 1e3 / reps)
    del g
    res.sort()
    return res[len(res) // 2]


def run(name: str, quant: str | None, kv: str, ablations: list[tuple[str, set[str], bool]]) -> dict:
    folder = make_random_model(SHAPE, "/tmp/pagoda-bench-models", DEV)
    config = EngineConfig(
        model=folder, device=DEV, max_model_len=MAXLEN, kv_cache_memory_gb=4.0, max_num_seqs=4,
        quantization=quant, fp8_lm_head=quant == "fp8", kv_cache_dtype=kv, load_format="dummy", enforce_eager=True,
    )
    runner = ModelRunner(config)
    model, dev, bs = runner.model, runner.device, runner.block_size
    nb = MAXLEN // bs
    used = math.ceil(CTX / bs)
    tables = torch.zeros(1, nb, dtype=torch.int32, device=dev)
    tables[0, :used] = torch.arange(1, used + 1, dtype=torch.int32, device=dev)
    slot = (1 + (CTX - 1) // bs) * bs + (CTX - 1) % bs
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([slot], dtype=torch.int64, device=dev), block_tables=tables,
        seq_lens=torch.tensor([CTX], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=dev), max_seq_len=MAXLEN, num_decodes=1,
    )
    ids = torch.tensor([123], dtype=torch.int64, device=dev)
    pos = torch.tensor([CTX - 1], dtype=torch.int64, device=dev)
    for a in model.attention_layers():  # no NaN from garbage fp8 bytes (timing is the same either way)
        a.k_cache.zero_()
        a.v_cache.zero_()

    out = {"run": name, "block_size": bs, "ctx": CTX}
    with torch.inference_mode():
        for label, names, head in ablations:
            def step():
                meta.decode_context = None
                h = model(ids, pos, meta)
                if head:
                    return argmax_rows(model.compute_logits(h))
                return h
            with patched(names):
                out[label] = round(time_graph(step), 2)
            print(name, label, out[label], "us", flush=True)
    del runner, model
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out


FULL = [
    ("base", set(), True),
    ("nopdl", {"nopdl"}, True),
    ("no_attn", {"attn"}, True),
    ("no_rope", {"rope"}, True),
    ("no_norm", {"norm"}, True),
    ("no_silu", {"silu"}, True),
    ("no_head", set(), False),
    ("gemv_only", {"attn", "rope", "norm", "silu"}, True),
    ("gemv_only_nohead", {"attn", "rope", "norm", "silu"}, False),
    ("base_again", set(), True),
]
FUSED = [("base", set(), True), ("unfused", {"unfused"}, True), ("base_again", set(), True),
         ("unfused_again", {"unfused"}, True)]
SHORT = [("base", set(), True), ("nopdl", {"nopdl"}, True), ("no_attn", {"attn"}, True),
         ("gemv_only", {"attn", "rope", "norm", "silu"}, True), ("base_again", set(), True)]

def patch_best(path: str) -> None:
    """The sweep's fastest fused-norm tiling per projection, for norm=True configs."""
    import re

    import kernels.triton_fp8_linear as t
    from kernels.triton_fp8_linear import GemvConfig
    rows = json.loads(open(path).read().strip().splitlines()[-1])
    best = {}
    for proj, nk in (("qkv", (6144, 4096)), ("gate_up", (28672, 4096))):
        cands = {k: v for k, v in rows[proj].items() if k.startswith("fused GemvConfig") and not isinstance(v, str)}
        key = min(cands, key=cands.get)
        kw = dict(re.findall(r"(\w+)=(\d+)", key))
        best[nk] = GemvConfig(**{a: int(b) for a, b in kw.items()})
        print("best fused", proj, best[nk], cands[key], flush=True)
    real = t.gemv_fp8_config
    t.gemv_fp8_config = lambda n, k, norm=False: best[(n, k)] if norm and (n, k) in best else real(n, k, norm)


if __name__ == "__main__":
    if os.environ.get("SWEEP"):
        patch_best(os.environ["SWEEP"])
    which = sys.argv[1:] or ["fp8kv", "fp8", "bf16"]
    results = []
    for w in which:
        if w == "preload":
            results.append(run(w, "fp8", "fp8", [("base", set(), True), ("nopreload", {"nopreload"}, True),
                                                 ("base_again", set(), True)]))
        elif w == "fused":
            results.append(run(w, "fp8", "fp8", FUSED))
        elif w == "fp8kv":
            results.append(run(w, "fp8", "fp8", FULL))
        elif w == "fp8":
            results.append(run(w, "fp8", "auto", SHORT))
        elif w == "bf16":
            results.append(run(w, None, "auto", SHORT))
        elif w == "bf16base":
            results.append(run(w, None, "auto", [("base", set(), True)]))
    print(json.dumps(results))
