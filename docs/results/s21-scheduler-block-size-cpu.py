"""T's requests through the scheduler alone (no worker): schedule() + update() a step, the prefill
phase and the decode phase apart, at 16- and 64-slot blocks (twice each).

    PYTHONPATH=. python docs/results/s21-scheduler-block-size-cpu.py
"""

import random
import time

from protocol import SamplingParams, StepResult
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerConfig


def run(bs: int) -> None:
    rng = random.Random(0)
    s = Scheduler(SchedulerConfig(num_blocks=600000 // bs, block_size=bs, max_model_len=4096, max_num_seqs=256,
                                  max_num_batched_tokens=8192, eos_token_ids=[2]))
    for i in range(256):
        prompt, out = rng.randint(100, 1024), rng.randint(100, 1024)
        s.add_request(Request(f"r{i}", [rng.randrange(3, 150000) for _ in range(prompt)],
                              SamplingParams(max_tokens=out, ignore_eos=True), "tok-0", out))
    spent = {"prefill": [0.0, 0], "decode": [0.0, 0]}
    while s.requests:
        t0 = time.perf_counter()
        plan = s.schedule()
        if plan is None:
            break
        done = [rid for rid in plan.num_scheduled_tokens
                if s.requests[rid].num_computed_tokens == s.requests[rid].num_tokens]
        s.update(StepResult(plan.step_id, done, [7] * len(done)))
        phase = "prefill" if any(n > 1 for n in plan.num_scheduled_tokens.values()) else "decode"
        spent[phase][0] += time.perf_counter() - t0
        spent[phase][1] += 1
    parts = [f"{phase} steps {n}, {t * 1e3:.0f} ms ({t / max(n, 1) * 1e3:.2f} ms a step)"
             for phase, (t, n) in spent.items()]
    print(f"block size {bs}: " + "; ".join(parts))


for bs in (16, 64, 16, 64):
    run(bs)
