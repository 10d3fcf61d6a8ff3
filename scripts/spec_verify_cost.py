"""The cost of verifying drafts on the GPU: the model runner alone on a random-weight shape.

Request A decodes greedily, one token a step (plain decoding, each step timed). Request B, the
same prompt, is then verified with the target's own greedy continuation as its drafts (a
self-draft whose drafts the target keeps, up to bf16 near-ties between a decode step and a
verification forward): k drafts a step, each step timed. A verified step's time over a plain
step's is what verification costs; (1 + kept) over that is the speed-up a free draft would
give. Prints one JSON object.

    python scripts/spec_verify_cost.py --shape llama3-8b --prompt-len 512 --tokens 128 --k 2 4 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from bench.shapes import make_random_model
from gpu_worker.model_runner import ModelRunner
from protocol.config import EngineConfig
from protocol.messages import CachedRequestData, NewRequestData, SamplingParams, StepPlan

GREEDY = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)


class Blocks:
    def __init__(self, block_size: int) -> None:
        self.bs, self.next, self.held = block_size, 0, {}

    def upto(self, rid: str, tokens: int) -> list[int]:
        need = math.ceil(tokens / self.bs) - self.held.get(rid, 0)
        ids = list(range(self.next, self.next + max(need, 0)))
        self.next += len(ids)
        self.held[rid] = self.held.get(rid, 0) + len(ids)
        return ids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--weights-dir", default="/tmp/pagoda-bench-weights")
    p.add_argument("--device", default="cuda")
    p.add_argument("--mixed-graph-tokens", type=int, default=0,
                   help="CUDA graphs for steps with several tokens per sequence (0: eager)")
    args = p.parse_args()
    folder = make_random_model(args.shape, args.weights_dir, args.device, weights=False)
    runner = ModelRunner(EngineConfig(model=folder, load_format="dummy", device=args.device, max_model_len=4096,
                                      kv_cache_memory_gb=8, max_num_seqs=8,
                                      cuda_graph_mixed_tokens=args.mixed_graph_tokens))
    vocab = runner.model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    blocks = Blocks(runner.block_size)
    step_id = 0

    def run(new, cached, scheduled, spec=None):
        nonlocal step_id
        step_id += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = runner.execute(StepPlan(step_id, new, cached, scheduled, [], spec_token_ids=spec or {}))
        return result, time.perf_counter() - began

    # A: plain greedy decoding.
    n = len(prompt)
    res, _ = run([NewRequestData("a", prompt, GREEDY, blocks.upto("a", n), 0)], [], {"a": n})
    greedy = list(res.token_ids)
    plain_s = []
    for _ in range(args.tokens + 2 * max(args.k)):
        res, dt = run([], [CachedRequestData("a", blocks.upto("a", n + 1), n)], {"a": 1})
        n += 1
        greedy += res.token_ids
        plain_s.append(dt)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = {"shape": args.shape, "prompt_len": args.prompt_len, "device": device,
           "mixed_graph_tokens": args.mixed_graph_tokens,
           "plain_step_ms": 1e3 * statistics.median(plain_s[8:]), "verify": {}}
    for k in args.k:
        rid = f"b{k}"
        n = len(prompt)
        res, _ = run([NewRequestData(rid, prompt, GREEDY, blocks.upto(rid, n), 0)], [], {rid: n})
        assert res.token_ids == greedy[:1]
        known = 1  # tokens known to B (the last not yet computed)
        times, kept_counts, same = [], [], True
        while known < args.tokens:
            drafts = greedy[known: known + k]
            computed = len(prompt) + known - 1
            res, dt = run([], [CachedRequestData(rid, blocks.upto(rid, computed + 1 + k), computed)],
                          {rid: 1 + k}, {rid: drafts})
            times.append(dt)  # a step's time does not depend on how many drafts it keeps
            # Acceptance counts while B follows A: after a near-tie went the other way (bf16: a
            # verification forward and a decode step round differently), A's tokens are no draft.
            same &= res.token_ids == greedy[known: known + len(res.token_ids)]
            if same:
                kept_counts.append(len(res.token_ids) - 1)
            known += len(res.token_ids)
        step_ms = 1e3 * statistics.median(times[2:] or times)
        out["verify"][k] = {
            "steps": len(times), "step_ms": step_ms, "cost_vs_plain": step_ms / out["plain_step_ms"],
            "acceptance": sum(kept_counts) / (k * len(kept_counts)) if kept_counts else None,
            "tokens_per_step": 1 + statistics.mean(kept_counts) if kept_counts else None,
            "speedup_if_drafts_were_free": (1 + statistics.mean(kept_counts)) * out["plain_step_ms"] / step_ms
            if kept_counts else None,
            "steps_following_a": len(kept_counts),
        }
        runner.execute(StepPlan(step_id + 1, [], [], {}, [rid]))
        step_id += 1
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
