"""Where a step's time goes: the model runner alone, driven by hand-built StepPlans on a GPU.

Prefills `--batch` random prompts, then times `--steps` decode steps eagerly and with CUDA
graphs, and prints the torch profiler's table for a few decode steps of each mode, then for
one more prefill step of new prompts (host time against device time). No
scheduler, no processes: what is left after this is the pipeline's share.

    python scripts/profile_step.py --shape qwen3-0.6b --batch 256 --prompt-len 512
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

import torch

from bench.shapes import make_random_model
from gpu_worker.model_runner import ModelRunner
from protocol.config import EngineConfig
from protocol.messages import CachedRequestData, NewRequestData, SamplingParams, StepPlan


class Driver:
    """A minimal scheduler: fixed-length prompts, greedy, blocks from a counter, never freed."""

    def __init__(self, runner: ModelRunner, batch: int, prompt_len: int, vocab: int, prefix: str = "r",
                 first_block: int = 0) -> None:
        self.runner = runner
        self.bs = runner.block_size
        self.next_block = first_block
        gen = torch.Generator().manual_seed(len(prefix))
        self.prompts = {
            f"{prefix}{i}": torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for i in range(batch)
        }
        self.computed = dict.fromkeys(self.prompts, 0)
        self.length = {r: prompt_len for r in self.prompts}
        self.blocks = {r: 0 for r in self.prompts}
        self.sent: set[str] = set()
        self.step_id = 0

    def _blocks_for(self, rid: str, upto: int) -> list[int]:
        need = math.ceil(upto / self.bs) - self.blocks[rid]
        ids = list(range(self.next_block, self.next_block + need))
        self.next_block += need
        self.blocks[rid] += need
        return ids

    def step(self, budget: int) -> float:
        new, cached, scheduled = [], [], {}
        for rid in self.prompts:
            n = min(self.length[rid] - self.computed[rid], budget)
            if n <= 0:
                continue
            budget -= n
            ids = self._blocks_for(rid, self.computed[rid] + n)
            if rid in self.sent:
                cached.append(CachedRequestData(rid, ids, self.computed[rid]))
            else:
                new.append(NewRequestData(rid, self.prompts[rid], SamplingParams(temperature=0), ids, 0))
                self.sent.add(rid)
            scheduled[rid] = n
            self.computed[rid] += n
        began = time.perf_counter()
        result = self.runner.execute(StepPlan(self.step_id, new, cached, scheduled, []))
        elapsed = time.perf_counter() - began
        self.step_id += 1
        for rid in result.request_ids:
            self.length[rid] += 1
        return elapsed


def run_mode(folder: str, args: argparse.Namespace, eager: bool) -> dict:
    config = EngineConfig(
        model=folder, device=args.device, max_model_len=args.max_model_len, enforce_eager=eager,
        kv_cache_memory_gb=args.kv_gb, max_num_seqs=2 * max(args.batch, 8),
        max_num_batched_tokens=args.max_num_batched_tokens, cuda_graph_mixed_tokens=args.mixed_graph_tokens,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, load_format=args.load_format,
    )
    began = time.perf_counter()
    runner = ModelRunner(config)
    start_s = time.perf_counter() - began
    driver = Driver(runner, args.batch, args.prompt_len, runner.model.config.vocab_size)
    prefill = []
    while min(driver.computed.values()) < args.prompt_len:
        prefill.append(driver.step(args.max_num_batched_tokens))
    for _ in range(5):  # warm up
        driver.step(args.max_num_batched_tokens)
    times = [driver.step(args.max_num_batched_tokens) for _ in range(args.steps)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            driver.step(args.max_num_batched_tokens)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
    table_gpu = ""
    if args.device == "cuda":
        table_gpu = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.gpu_rows,
                                              max_name_column_width=60)
    # One more prefill step, warm this time (kernels compiled, allocator settled): new prompts.
    fresh = Driver(runner, args.batch, args.prompt_len, runner.model.config.vocab_size, "p", driver.next_block)
    with torch.profiler.profile(activities=activities) as prefill_prof:
        prefill_ms = 1e3 * fresh.step(args.max_num_batched_tokens)
    events = prefill_prof.key_averages()
    prefill_table = events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    if args.device == "cuda":
        prefill_table += events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    device_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3
    times.sort()
    out = {
        "mode": "eager" if eager else "cuda-graphs",
        "start_s": round(start_s, 1),
        "decode_step_ms_median": round(1e3 * times[len(times) // 2], 3),
        "decode_step_ms_min": round(1e3 * times[0], 3),
        "decode_tok_s": round(args.batch / times[len(times) // 2], 1),
        "prefill_steps_ms": [round(1e3 * t, 1) for t in prefill],
        # A warm prefill step under the profiler: its wall time and the device's busy time.
        "warm_prefill_step_ms": round(prefill_ms, 1),
        "warm_prefill_tokens": min(args.max_num_batched_tokens, args.batch * args.prompt_len),
        "warm_prefill_device_ms": round(device_ms, 1),
    }
    print(json.dumps(out))
    print(table)
    print(table_gpu)
    print("warm prefill step:")
    print(prefill_table)
    del runner, driver
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--kv-gb", type=float, default=30.0)
    parser.add_argument("--modes", default="eager,graphs")
    parser.add_argument("--mixed-graph-tokens", type=int, default=0,
                        help="graphs for prefill steps too, up to this many tokens (--cuda-graph-mixed-tokens)")
    parser.add_argument("--quantization", default=None, help="as `pagoda serve --quantization` (fp8)")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--load-format", default="auto", help="dummy: weights made at load (no weights saved)")
    parser.add_argument("--gpu-rows", type=int, default=12, help="rows of the table by device time")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models-dir", default="/tmp/pagoda-bench-models")
    args = parser.parse_args()
    folder = make_random_model(args.shape, args.models_dir, args.device,
                               weights=None if args.load_format != "dummy" else False)
    results = [run_mode(folder, args, eager=(m == "eager")) for m in args.modes.split(",")]
    print("SUMMARY", args.shape, args.batch, json.dumps(results))


if __name__ == "__main__":
    main()
