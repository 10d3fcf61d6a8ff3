"""Property tests: random arrivals, aborts, steps in flight and worker restarts through the Scheduler.

Tiny block pools force preemptions; prompts drawn from a few shared stems force prefix hits;
n > 1 forces forks with copy-on-write. After every step the block pool must match the block
tables exactly, and the token-level worker (tests/scheduler/sim_worker.py) checks that every request
reads its own tokens through its block table. At the end every request that was not aborted
must have produced exactly what it produces alone.
"""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol import SamplingParams, StepPlan
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.sim_worker import EOS, SimWorker, reference_output

STEMS = [[1 + (i * 7 + j) % 37 for j in range(40)] for i in range(3)]


def check_pool(s: Scheduler) -> None:
    """Reference counts equal the block tables holding each block; free and cached agree."""
    pool = s.block_pool
    held: dict[int, int] = {}
    for req in s.requests.values():
        assert len(set(req.block_ids)) == len(req.block_ids), f"{req} holds a block twice"
        for b in req.block_ids:
            held[b] = held.get(b, 0) + 1
    for b in range(pool.num_blocks):
        assert pool.ref_counts[b] == held.get(b, 0), f"block {b}: ref {pool.ref_counts[b]}, held {held.get(b, 0)}"
    free = pool.free_block_ids()
    assert len(set(free)) == len(free) == pool.num_free
    assert set(free) == {b for b in range(pool.num_blocks) if b not in held}, "leaked or double-freed block"
    for h, b in pool.cached.items():
        assert pool.block_hash[b] == h
    assert sum(h is not None for h in pool.block_hash) == len(pool.cached)
    if not s.config.enable_prefix_caching:
        assert not pool.cached


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4, 16]),
        num_blocks=st.integers(4, 24),
        max_num_seqs=st.integers(1, 6),
        budget=st.sampled_from([1, 3, 8, 32, 512]),
        caching=st.booleans(),
        depth=st.sampled_from([1, 2]),
    )
    def setup(self, block_size, num_blocks, max_num_seqs, budget, caching, depth):
        self.max_model_len = min(num_blocks * block_size, 96)
        self.config = SchedulerConfig(
            num_blocks=num_blocks, block_size=block_size, max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, eos_token_ids=[EOS],
            enable_prefix_caching=caching, model_name="m",
        )
        self.s = Scheduler(self.config)
        self.worker = SimWorker(num_blocks, block_size)
        self.depth = depth
        self.in_flight: deque[StepPlan] = deque()
        self.outputs: dict[tuple[str, int], list[int]] = {}
        self.finish: dict[tuple[str, int], str] = {}
        self.expected: dict[tuple[str, int], list[int]] = {}
        self.aborted: set[str] = set()
        self.count = 0

    @rule(
        stem=st.integers(0, len(STEMS) - 1),
        shared=st.integers(0, 40),
        own=st.lists(st.integers(1, 39), max_size=12),
        max_tokens=st.integers(1, 12),
        n=st.sampled_from([1, 1, 2, 3]),
        seed=st.none() | st.integers(0, 100),
    )
    def add(self, stem, shared, own, max_tokens, n, seed):
        prompt = (STEMS[stem][:shared] + own)[: self.max_model_len - 1] or [5]
        max_tokens = min(max_tokens, self.max_model_len - len(prompt))
        rid = f"r{self.count}"
        self.count += 1
        sp = SamplingParams(max_tokens=max_tokens, n=n, seed=seed)
        self.s.add_request(Request(rid, prompt, sp, "tok", max_tokens))
        for i in range(n):
            sample_seed = None if seed is None else seed + i
            self.expected[(rid, i)] = reference_output(prompt, sample_seed, max_tokens, self.max_model_len)

    @precondition(lambda self: self.s.requests)
    @rule(data=st.data())
    def abort(self, data):
        parents = sorted({r.parent_id for r in self.s.requests.values()})
        rid = data.draw(st.sampled_from(parents))
        index = data.draw(st.none() | st.integers(0, 2))
        self.s.abort([rid], None if index is None else [index])
        self.aborted.add(rid)

    @precondition(lambda self: len(self.in_flight) < self.depth)
    @rule()
    def plan(self) -> None:
        self._plan()

    def _plan(self) -> bool:
        plan = self.s.schedule()
        if plan is None:
            return False
        total = sum(plan.num_scheduled_tokens.values())
        assert total <= self.config.max_num_batched_tokens, f"{total} tokens over the budget"
        assert len(plan.num_scheduled_tokens) <= self.config.max_num_seqs
        assert self.s.num_running <= self.config.max_num_seqs
        self.in_flight.append(plan)
        return True

    @precondition(lambda self: self.in_flight)
    @rule()
    def complete(self):
        result = self.worker.execute(self.in_flight.popleft())
        for _, out in self.s.update(result).outputs:
            key = (out.request_id, out.index)
            assert key not in self.finish, f"{key} got a token after it finished"
            self.outputs.setdefault(key, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                self.finish[key] = out.finish_reason

    @precondition(lambda self: self.count > 0)
    @rule()
    def restart_worker(self):
        self.in_flight.clear()
        self.worker = SimWorker(self.config.num_blocks, self.config.block_size)
        self.s.reset_worker()

    @invariant()
    def pool_matches_block_tables(self):
        if hasattr(self, "s"):
            check_pool(self.s)

    def teardown(self):
        if not hasattr(self, "s"):
            return
        while self.in_flight or self.s.has_work:
            planned = False
            if len(self.in_flight) < self.depth:
                planned = self._plan()
            assert planned or self.in_flight, "work left but nothing to schedule: the scheduler is stuck"
            self.complete()
            check_pool(self.s)
        plan = self.s.schedule()  # tell the worker to drop the last finished requests
        if plan is not None:
            self.worker.execute(plan)
        assert not self.worker.requests and not self.s.requests
        assert self.s.block_pool.num_free == self.config.num_blocks
        for key, expected in self.expected.items():
            if key[0] in self.aborted:
                continue
            assert self.outputs.get(key) == expected, f"{key}: {self.outputs.get(key)} != {expected} alone"
            last = expected[-1]
            assert self.finish[key] == ("stop" if last == EOS else "length")


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestScheduler = SchedulerMachine.TestCase
