"""The real Scheduler driving the real ModelRunner (SmolLM2-135M on the CPU) in one process.

Each run plans steps as the scheduler service does, up to two in flight (async scheduling:
step n+1 is planned before step n's tokens are back), and feeds the results back in order.
Greedy outputs must not depend on any of it: prefix caching, chunk sizes, a pool so small
that requests are preempted, steps in flight, or running as one of n parallel samples.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

import pytest
import torch

from gpu_worker.model_runner import ModelRunner
from protocol import EngineConfig, SamplingParams, StepPlan
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerConfig
from tokenizer_svc.tokenizer_loader import load_tokenizer

BLOCK_SIZE = 16
MAX_TOKENS = 8
SYSTEM = (
    "You are a patient teacher at a small school by the sea. You answer every question a pupil asks "
    "with one short sentence that is true, and you never use difficult words."
)
# 60..62 tokens each with the system message: every answer crosses into a 5th block.
QUESTIONS = [
    "What is the capital city of France, the country in Europe?",
    "Why is the sky blue on a sunny day in summer?",
    "What sweet food do honey bees make in their hives?",
    "Can you name a prime number that is bigger than ten?",
]
_ids = itertools.count()


@pytest.fixture(scope="module")
def runner() -> Iterator[ModelRunner]:
    # One thread: OpenMP threads spinning against other processes on a small shared machine slow each step down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ModelRunner(EngineConfig(num_gpu_blocks_override=96, max_model_len=512))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Four chat prompts sharing a system message of more than two full blocks."""
    tok = load_tokenizer(EngineConfig())
    return [
        list(tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], add_generation_prompt=True
        )["input_ids"])
        for q in QUESTIONS
    ]


def generate(
    runner: ModelRunner,
    requests: list[tuple[list[int], SamplingParams]],
    *,
    num_blocks: int = 96,
    budget: int = 2048,
    caching: bool = True,
    depth: int = 2,
) -> tuple[list[dict[int, list[int]]], Scheduler, list[StepPlan]]:
    """Run `requests` to the end; each one's tokens per sample index, the scheduler, the plans."""
    s = Scheduler(
        SchedulerConfig(
            num_blocks=num_blocks, block_size=BLOCK_SIZE, max_model_len=num_blocks * BLOCK_SIZE, max_num_seqs=8,
            max_num_batched_tokens=budget, eos_token_ids=list(runner.eos_token_ids),
            enable_prefix_caching=caching, model_name="smollm2",
        )
    )
    # Ids unique across runs: the one runner outlives every scheduler.
    ids = [f"r{next(_ids)}" for _ in requests]
    for rid, (prompt, sp) in zip(ids, requests):
        s.add_request(Request(rid, prompt, sp, "tok", sp.max_tokens or MAX_TOKENS))
    outputs: dict[str, dict[int, list[int]]] = {rid: {} for rid in ids}
    plans: list[StepPlan] = []
    in_flight: deque[StepPlan] = deque()
    while s.has_work or in_flight:
        while len(in_flight) < depth and (plan := s.schedule()) is not None:
            in_flight.append(plan)
            plans.append(plan)
        for _, out in s.update(runner.execute(in_flight.popleft())).outputs:
            outputs[out.request_id].setdefault(out.index, []).extend(out.new_token_ids)
    last = s.schedule()  # the runner drops the last finished requests
    if last is not None:
        runner.execute(last)
    assert not runner.input_batch.requests and s.block_pool.num_free == num_blocks
    return [outputs[rid] for rid in ids], s, plans


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def reference(runner, prompts) -> list[list[int]]:
    """One step at a time, no prefix caching, whole prompts in one step."""
    outputs, _, _ = generate(runner, [(p, GREEDY) for p in prompts], caching=False, depth=1)
    assert all(len(o[0]) > 3 for o in outputs)
    return [o[0] for o in outputs]


def test_async_scheduling_with_prefix_caching_gives_the_same_greedy_tokens(runner, prompts, reference):
    outputs, s, plans = generate(runner, [(p, GREEDY) for p in prompts])
    assert [o[0] for o in outputs] == reference
    # The later prompts reuse the system prefix that the first computes in the same step.
    assert [r.num_computed_tokens for r in plans[0].new_requests][1:] == [32, 32, 32]
    assert s.kv.num_hits == 3 * 32


def test_small_chunks_give_the_same_greedy_tokens(runner, prompts, reference):
    outputs, _, plans = generate(runner, [(p, GREEDY) for p in prompts], budget=32)
    assert [o[0] for o in outputs] == reference
    assert max(sum(p.num_scheduled_tokens.values()) for p in plans) == 32


def test_preempted_requests_give_the_same_greedy_tokens(runner, prompts, reference):
    # The prompts take 7 blocks (3 shared, one each of their own); crossing into a 5th block
    # each, the decodes must preempt the newest request.
    num_blocks = 8
    outputs, s, _ = generate(runner, [(p, GREEDY) for p in prompts], num_blocks=num_blocks)
    assert s.num_preemptions > 0
    assert [o[0] for o in outputs] == reference


def test_parallel_greedy_samples_fork_from_one_prefill_and_match_a_single_request(runner, prompts, reference):
    prompt = prompts[1]
    assert (len(prompt) - 1) % BLOCK_SIZE, "the last prompt token must share a block, to exercise the copy"
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, n=3)
    outputs, _, plans = generate(runner, [(prompt, sp)])
    assert outputs[0] == {0: reference[1], 1: reference[1], 2: reference[1]}
    assert sum(len(p.block_copies) for p in plans) == 2
    assert sum(p.num_scheduled_tokens.get(f"{r.request_id}", 0) for p in plans for r in p.new_requests) == len(
        prompt
    ) + 2  # the prompt once, plus each forked sample's last prompt token


def test_seeded_parallel_samples_equal_single_requests_with_seed_plus_index(runner, prompts):
    sp = SamplingParams(temperature=1.0, max_tokens=6, seed=11)
    together, _, _ = generate(runner, [(prompts[2], SamplingParams(temperature=1.0, max_tokens=6, seed=11, n=2))])
    alone, _, _ = generate(
        runner, [(prompts[2], sp), (prompts[2], SamplingParams(temperature=1.0, max_tokens=6, seed=12))]
    )
    assert together[0] == {0: alone[0][0], 1: alone[1][0]}
    assert together[0][0] != together[0][1]
