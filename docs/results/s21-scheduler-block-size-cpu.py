"""T's requests through the scheduler alone (no worker): schedule()+update() per step at 16 / 64-slot blocks.

    PYTHONPATH=. python docs/results/s21-scheduler-block-size-cpu.py
"""
import random, time
from protocol import SamplingParams, StepResult
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerConfig

def run(bs):
    rng = random.Random(0)
    s = Scheduler(SchedulerConfig(num_blocks=(600000 // bs), block_size=bs, max_model_len=4096, max_num_seqs=256,
                                  max_num_batched_tokens=8192, eos_token_ids=[2]))
    for i in range(256):
        p = rng.randint(100, 1024); o = rng.randint(100, 1024)
        s.add_request(Request(f"r{i}", [rng.randrange(3, 150000) for _ in range(p)],
                              SamplingParams(max_tokens=o, ignore_eos=True), "tok-0", o))
    pre = dec = 0.0; npre = ndec = 0
    while True:
        t0 = time.perf_counter()
        plan = s.schedule()
        if plan is None:
            break
        done = [rid for rid, n in plan.num_scheduled_tokens.items()
                if s.requests[rid].num_computed_tokens == s.requests[rid].num_tokens]
        s.update(StepResult(plan.step_id, done, [7] * len(done)))
        dt = time.perf_counter() - t0
        if any(n > 1 for n in plan.num_scheduled_tokens.values()):
            pre += dt; npre += 1
        else:
            dec += dt; ndec += 1
        if not s.requests:
            break
    print(f"bs {bs}: prefill-phase steps {npre} {pre*1e3:.0f} ms ({pre/npre*1e3:.2f} ms/step); decode steps {ndec} {dec*1e3:.0f} ms ({dec/max(ndec,1)*1e3:.3f} ms/step)")

for bs in (16, 64, 16, 64):
    run(bs)
