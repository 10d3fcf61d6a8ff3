"""The offline workloads of docs/BENCHMARKS.md: T (throughput), L (latency), P (prefix caching).

Each runs Pagoda through the offline `LLM` API (the same processes as `pagoda serve`), and,
with `--peer hf`, Hugging Face `transformers` on the very same weights and requests.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from bench.limits import ModelCost

logger = logging.getLogger(__name__)


@dataclass
class Req:
    prompt_ids: list[int]
    output_len: int  # exact with ignore_eos, else at most
    ignore_eos: bool = True


def random_requests(num: int, input_lens: tuple[int, int], output_lens: tuple[int, int], vocab: int,
                    seed: int = 0, prefix: list[int] | None = None) -> list[Req]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(num):
        n_in = rng.randint(*input_lens)
        ids = [rng.randrange(vocab - 1) for _ in range(n_in)]
        reqs.append(Req((prefix or []) + ids, rng.randint(*output_lens)))
    return reqs


# Workload T's constrained requests follow this schema (nested objects, an enum, an array, a pattern).
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "tier": {"enum": ["bronze", "silver", "gold"]}},
            "required": ["name", "tier"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                "required": ["sku", "quantity"],
            },
        },
        "notes": {"type": "string"},
    },
    "required": ["id", "customer", "items", "notes"],
}


def _constrained(i: int, fraction: float) -> bool:
    """Whether request i of a run is constrained: spread evenly, `fraction` of them."""
    return int((i + 1) * fraction) > int(i * fraction)


def _draft_model(spec: str | dict | None) -> bool:
    from protocol.config import SpeculativeConfig

    text = json.dumps(spec) if isinstance(spec, dict) else spec
    return bool(text) and SpeculativeConfig.parse(text).method == "draft_model"


def _wait_for_the_draft_worker(llm: Any, prompt: list[int], timeout_s: float = 900.0) -> None:
    from frontend import SamplingParams

    deadline = time.monotonic() + timeout_s
    while llm.scheduler_stats.spec_num_drafts == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the draft worker proposed nothing within {timeout_s:.0f} s")
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        time.sleep(1.0)


def run_pagoda(
    model: str, reqs: list[Req], engine_args: dict[str, Any], structured_fraction: float = 0.0,
    one_at_a_time: bool = False,
) -> dict[str, Any]:
    """`structured_fraction`: that share of the requests constrained by BENCH_SCHEMA, and the
    TTFT a schema adds measured first (`schema_ttft`). `one_at_a_time`: each request alone
    (batch 1), in order, instead of all at once."""
    from frontend import LLM, SamplingParams
    from protocol import SchedulerStats
    from protocol.messages import StructuredOutputs

    schema = StructuredOutputs(json=json.dumps(BENCH_SCHEMA))
    schema_ttft = None
    with LLM(model=model, **engine_args) as llm:
        # Warm up on a prompt as long as the first one (the GEMMs and kernels a step of that size
        # uses are loaded and chosen before the clock starts, as `vllm bench latency` warms up)
        # whose tokens are all shifted by one, so that no block of it is a prefix-cache hit later.
        warm_up = [t + 1 for t in reqs[0].prompt_ids]
        llm.generate([warm_up], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        if _draft_model(engine_args.get("speculative_config")):
            _wait_for_the_draft_worker(llm, warm_up)  # it loads after the target serves
        if structured_fraction:
            schema_ttft = _schema_ttft(llm, reqs[0].prompt_ids)
        params = [
            SamplingParams(
                temperature=0, ignore_eos=r.ignore_eos, max_tokens=r.output_len,
                structured_outputs=schema if _constrained(i, structured_fraction) else None,
            )
            for i, r in enumerate(reqs)
        ]
        before = _settled_stats(llm, SchedulerStats())  # the warm-up's final figures
        start = time.perf_counter()
        if one_at_a_time:
            outs = [llm.generate([r.prompt_ids], [p], use_tqdm=False)[0] for r, p in zip(reqs, params)]
        else:
            outs = llm.generate([r.prompt_ids for r in reqs], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = _settled_stats(llm, before)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts = [o.metrics["time_to_first_token_s"] for o in outs]
    decode = [o.metrics["decode_tokens_per_s"] for o in outs if "decode_tokens_per_s" in o.metrics]
    return {
        "elapsed_s": elapsed,
        "num_requests": len(reqs),
        "constrained_requests": sum(_constrained(i, structured_fraction) for i in range(len(reqs))),
        "schema_ttft": schema_ttft,
        "output_tokens": out_tokens,
        "requested_output_tokens": sum(r.output_len for r in reqs),
        "prompt_tokens": sum(len(r.prompt_ids) for r in reqs),
        "output_tokens_per_s": out_tokens / elapsed,
        "requests_per_s": len(reqs) / elapsed,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": statistics.median(ttfts),
        "decode_tokens_per_s_mean": statistics.fmean(decode) if decode else 0.0,
        "prefix_cache_queries": stats.prefix_cache_queries,
        "prefix_cache_hits": stats.prefix_cache_hits,
        "num_preemptions": stats.num_preemptions,
        # Share of the worker's time spent waiting for the next plan while work was queued.
        "worker_idle_fraction": _idle_fraction(before, stats),
        "output_token_ids": [o.outputs[0].token_ids for o in outs],
        **_spec_figures(before, stats),
    }


def _spec_figures(before: Any, after: Any) -> dict[str, Any]:
    """Speculative decoding over the run: drafts, acceptance rate, mean tokens per verified step."""
    drafts = after.spec_num_drafts - before.spec_num_drafts
    if not drafts:
        return {}
    tokens = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    per_pos = [a - (before.spec_num_accepted_tokens_per_pos[i] if i < len(before.spec_num_accepted_tokens_per_pos)
                    else 0) for i, a in enumerate(after.spec_num_accepted_tokens_per_pos)]
    return {"spec_num_drafts": drafts, "spec_num_draft_tokens": tokens, "spec_num_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / tokens if tokens else 0.0,
            "spec_mean_acceptance_length": 1 + accepted / drafts, "spec_accepted_per_pos": per_pos}


def _schema_ttft(llm: Any, prompt_ids: list[int], reps: int = 5) -> dict[str, Any]:
    """TTFT at batch 1 (median of `reps`, seconds): no schema; a schema never seen (compiled in a
    tokenizer, a matcher made in the worker); the same schema again (the tokenizer's cache); and
    the very first schema (llguidance's view of the vocabulary built, in both processes)."""
    from frontend import SamplingParams
    from protocol.messages import StructuredOutputs

    prompt = list(reversed(prompt_ids[:128]))
    counter = iter(range(1, 10**6))

    def ttft(structured: StructuredOutputs | None) -> float:
        k = next(counter) % len(prompt)
        ids = prompt[k:] + prompt[:k]  # rotated: a prompt of its own, no prefix-cache hit
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, structured_outputs=structured)
        out = llm.generate([ids], params, use_tqdm=False)[0]
        return out.metrics["time_to_first_token_s"]

    def schema(k: int) -> StructuredOutputs:
        return StructuredOutputs(json=json.dumps({**BENCH_SCHEMA, "title": f"schema-{k}"}))

    first = ttft(schema(-1))
    none = statistics.median(ttft(None) for _ in range(reps))
    cold = statistics.median(ttft(schema(k)) for k in range(reps))
    cached = statistics.median(ttft(schema(0)) for _ in range(reps))
    return {"first_schema_s": first, "no_schema_s": none, "new_schema_s": cold, "cached_schema_s": cached}


def _settled_stats(llm: Any, before: Any, timeout_s: float = 10.0) -> Any:
    """The scheduler's figures once they cover the whole run: idle, and past the earlier steps.

    They arrive with a delay (at most every 0.2 s while busy, within ~1 s of going idle).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = llm.scheduler_stats
        if stats.num_steps > before.num_steps and stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        time.sleep(0.05)
    return llm.scheduler_stats


def _idle_fraction(before: Any, after: Any) -> float:
    idle = after.worker_idle_s - before.worker_idle_s
    busy = after.worker_busy_s - before.worker_busy_s
    return idle / (idle + busy) if idle + busy > 0 else 0.0


def pretrained_args(model: str) -> tuple[str, dict[str, Any]]:
    """`from_pretrained`'s arguments for a folder or hub id, or for a GGUF file (transformers'
    dequantized model of it, converted once: `hf_folder_for_gguf`)."""
    if model.endswith(".gguf") and os.path.isfile(model):
        return (hf_folder_for_gguf(model), {})
    return (model, {})


def hf_folder_for_gguf(path: str) -> str:
    """transformers' own model of a GGUF file, dequantized to fp32 once and saved (safetensors)
    under $PAGODA_CACHE_DIR/hf-from-gguf, keyed by the file's path, size and mtime as the
    converted tokenizers are: transformers' GGUF load takes ~17 s for the embedded model on a
    2-core CPU (it walks the whole vocabulary, then dequantizes), the saved copy about a second.
    The same tensors either way (fp32 saved as it is)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenizer_svc.tokenizer_loader import cache_dir, file_cache_key, save_to_cache

    folder = os.path.join(cache_dir(), "hf-from-gguf", file_cache_key(path))
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    directory, file = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    # Dequantized, the model is a plain fp32 one: saved as such (transformers refuses to save a
    # model that still names its GGUF quantizer).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_to_cache(folder, model.save_pretrained)
    return folder


def _hf_model(model: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    path, kw = pretrained_args(model)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_hf_static(model: str, reqs: list[Req], device: str, batch_size: int = 64) -> dict[str, Any]:
    """`generate` on static batches, left padded; each batch runs to its longest output."""
    import torch

    hf = _hf_model(model, device)
    pad = 0
    start = time.perf_counter()
    useful = 0
    with torch.inference_mode():
        for i in range(0, len(reqs), batch_size):
            batch = reqs[i : i + batch_size]
            width = max(len(r.prompt_ids) for r in batch)
            ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=device)
            mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                                device=device)
            n = max(r.output_len for r in batch)
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=pad, eos_token_id=None)
            useful += sum(r.output_len for r in batch)
    _sync(device)
    elapsed = time.perf_counter() - start
    del hf
    gc.collect()
    return {"elapsed_s": elapsed, "output_tokens": useful, "output_tokens_per_s": useful / elapsed}


def run_hf_continuous(model: str, reqs: list[Req], device: str, attn: str = "sdpa") -> dict[str, Any]:
    """`generate_batch`, transformers' continuous batching, run to the longest output."""
    from transformers import GenerationConfig

    hf = _hf_model(model, device)
    if attn != "sdpa":
        hf.set_attn_implementation(attn)
    n = max(r.output_len for r in reqs)
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    # No inference_mode here: the manager's thread updates tensors made outside it.
    outs = hf.generate_batch([r.prompt_ids for r in reqs], generation_config=cfg, progress_bar=False,
                             **_hf_cpu_cache(reqs, n, device))
    _sync(device)
    elapsed = time.perf_counter() - start
    produced = sum(min(len(o.generated_tokens), r.output_len) for o, r in zip(outs.values(), reqs))
    # Each call sizes its KV cache and captures its CUDA graphs before it takes the requests;
    # Pagoda's figure leaves its start-up out, so this one does too where the outputs say when
    # the requests were added and finished (perf_counter, this process).
    added = [getattr(o, "created_time", None) for o in outs.values()]
    ended = [(getattr(o, "lifespan", None) or (-1, -1))[1] for o in outs.values()]
    serving = elapsed
    if added and None not in added and min(ended) > 0:
        serving = max(ended) - min(added)
    del hf
    gc.collect()
    return {"elapsed_s": elapsed, "serving_s": serving, "startup_s": elapsed - serving, "output_tokens": produced,
            "output_tokens_per_s": produced / serving, "attn_implementation": attn}


def _hf_cpu_cache(reqs: list[Req], max_new_tokens: int, device: str, page_size: int = 256) -> dict[str, Any]:
    """On the CPU, `generate_batch` sizes its KV cache from the free system RAM (0.9 of it, as of a
    GPU's free memory): tens of GB zeroed before the first request, a minute's start-up on a big host.
    There it gets the blocks that every request at once needs (its start-up is left out of the rate
    anyway; elsewhere transformers sizes it). Twice that, so none ever waits for a block."""
    if not device.startswith("cpu"):
        return {}
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # older transformers: its own sizing
        return {}
    blocks = sum(-(-(len(r.prompt_ids) + max_new_tokens) // page_size) for r in reqs)
    return {"continuous_batching_config": ContinuousBatchingConfig(page_size=page_size, num_blocks=2 * blocks)}


def run_hf_latency(model: str, req: Req, device: str) -> dict[str, Any]:
    import torch

    hf = _hf_model(model, device)
    ids = torch.tensor([req.prompt_ids], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf.generate(input_ids=ids, max_new_tokens=2, **kw)
        _sync(device)
        t = time.perf_counter()
        hf.generate(input_ids=ids, max_new_tokens=1, **kw)
        _sync(device)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(input_ids=ids, max_new_tokens=req.output_len, min_new_tokens=req.output_len, **kw)
        _sync(device)
        total = time.perf_counter() - t
    del hf
    gc.collect()
    return {"ttft_s": ttft, "decode_tokens_per_s": (req.output_len - 1) / max(total - ttft, 1e-9)}


def run_llamacpp_latency(model: str, req: Req, device: str, measure: Any = None) -> dict[str, Any]:
    """llama.cpp (llama-cpp-python) on the same GGUF file, greedy, one stream: its TTFT and decode
    tok/s measured as `run_hf_latency` does, through its Python generator.

    It runs in a child process: llama.cpp's AMX matmul (its "extra buffer types", taken where the
    CPU has AMX) died with SIGSEGV on a 2-core AMX VM (ggml_backend_amx_mul_mat), which would take
    the whole bench down. Where the child dies by a signal, it runs again without the extra buffer
    types (llama_model_params.use_extra_bufts = false), and the result says so. `measure`: what
    the child runs (tests), `_llamacpp_latency` by default."""
    if measure is None:
        measure = _llamacpp_latency
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise SystemExit("--peer llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from None
    if not model.endswith(".gguf"):
        raise SystemExit(f"--peer llama.cpp runs GGUF files, not {model}")

    def in_child(extra: bool) -> dict[str, Any]:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return {**pool.submit(measure, model, req, device, extra).result(), "extra_buffer_types": extra}

    try:
        return in_child(True)
    except BrokenProcessPool:  # the child died (a signal)
        logger.warning("llama.cpp died in its child process; running it again without extra buffer types")
    return {**in_child(False), "note": "llama.cpp's extra buffer types (AMX, repacking) crashed here; run without them"}


def _llamacpp_latency(model: str, req: Req, device: str, extra_buffer_types: bool) -> dict[str, Any]:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if not extra_buffer_types:
        defaults = lib.llama_model_default_params

        def without_extra() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_extra  # what Llama() builds its model params from
    gpu_layers = -1 if device.startswith("cuda") else 0
    llm = Llama(model_path=model, n_ctx=len(req.prompt_ids) + req.output_len + 8, n_threads=os.cpu_count(),
                n_gpu_layers=gpu_layers, verbose=False)

    def generate(n: int) -> tuple[float, float]:
        llm.reset()  # else generate reuses the cached prompt
        began = time.perf_counter()
        first = began
        for i, _ in enumerate(llm.generate(req.prompt_ids, temp=0.0, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == n:
                break
        return first - began, time.perf_counter() - first

    generate(2)  # warm up
    ttft, decode = generate(req.output_len)
    llm.close()
    return {"ttft_s": ttft, "decode_tokens_per_s": (req.output_len - 1) / max(decode, 1e-9), "threads": os.cpu_count()}


def throughput_limit(cost: ModelCost, reqs: list[Req]) -> float:
    """Output tok/s if every step only read what it must and every prefill ran at the matrix rate.

    All requests run at once (the fewest steps, so the fewest weight reads); each decode step
    reads the weights once plus every running sequence's K and V.
    """
    steps = max(r.output_len for r in reqs)
    seconds = sum(cost.prefill_seconds(len(r.prompt_ids)) for r in reqs)
    for s in range(steps):
        ctx = sum(len(r.prompt_ids) + s for r in reqs if r.output_len > s)
        seconds += cost.decode_step_seconds(ctx)
    return sum(r.output_len for r in reqs) / seconds
