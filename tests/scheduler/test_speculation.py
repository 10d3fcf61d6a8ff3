"""Speculative decoding in the scheduler: n-gram drafts scheduled, the rejected ones rolled back,
and every request ending with the tokens it gets without drafts (the sim worker verifies drafts
greedily against a deterministic model that often repeats itself, so drafts are both kept and
rejected)."""

from __future__ import annotations

from collections import deque

import pytest

from protocol import DraftPlan, DraftResult, SamplingParams
from protocol.config import SpeculativeConfig
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.sim_worker import EOS, VOCAB, SimWorker, reference_output

SPEC = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}')


def copying_model(tokens: list[int], seed: int | None) -> int:
    """Mostly continues the latest earlier occurrence of the last token (so n-gram drafts are
    often right), but every 5th position and a sequence's first repeat go their own way."""
    last = tokens[-1]
    earlier = [i for i in range(len(tokens) - 1) if tokens[i] == last]
    if not earlier or len(tokens) % 5 == 0:
        return (hash((tuple(tokens[-3:]), len(tokens))) % (VOCAB - 1)) + 1  # never EOS
    return tokens[earlier[-1] + 1]


def make(num_blocks: int = 64, spec: SpeculativeConfig | None = SPEC, **kw) -> Scheduler:
    cfg = dict(num_blocks=num_blocks, block_size=4, max_model_len=256, max_num_seqs=8,
               max_num_batched_tokens=64, eos_token_ids=[EOS], speculative=spec)
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))


def request(rid: str, prompt: list[int], max_tokens: int, **sp) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sp), "tok", max_tokens)


def prompts(n: int) -> list[list[int]]:
    # Each prompt repeats a motif, so the outputs copy from it.
    return [[1 + (i * 7 + j % (3 + i)) % (VOCAB - 1) for j in range(6 + 5 * i)] for i in range(n)]


def drain(s: Scheduler, worker: SimWorker, depth: int) -> tuple[dict[str, list[int]], list]:
    outputs: dict[str, list[int]] = {}
    plans, in_flight = [], deque()
    while s.has_work or in_flight:
        while len(in_flight) < depth and (plan := s.schedule()) is not None:
            in_flight.append(plan)
            plans.append(plan)
        for _, out in s.update(worker.execute(in_flight.popleft())).outputs:
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert s.block_pool.num_free == s.block_pool.num_blocks and not s.requests  # nothing leaked
    return outputs, plans


@pytest.mark.parametrize("depth", [1, 2], ids=["sync", "async"])
@pytest.mark.parametrize("num_blocks", [64, 16], ids=["roomy", "preempting"])
def test_requests_end_with_their_tokens_without_drafts(depth, num_blocks) -> None:
    s = make(num_blocks)
    worker = SimWorker(num_blocks, 4, copying_model)
    lengths = [40, 23, 31, 17]
    for i, (p, n) in enumerate(zip(prompts(4), lengths)):
        s.add_request(request(f"r{i}", p, n))
    outputs, plans = drain(s, worker, depth)
    for i, (p, n) in enumerate(zip(prompts(4), lengths)):
        assert outputs[f"r{i}"] == reference_output(p, None, n, 256, ignore_eos=True, model=copying_model)
    # Drafts were scheduled, some kept and some not, and never past max_tokens.
    assert sum(len(p.spec_token_ids) for p in plans) > 10
    assert 0 < s.spec.num_accepted_tokens < s.spec.num_draft_tokens
    scheduled = sum(len(p.spec_token_ids) for p in plans)
    # Each drafted step is counted once verified; a preemption drops the one in flight.
    assert 0 <= scheduled - s.spec.num_drafts <= s.num_preemptions
    assert s.spec.accepted_per_pos[0] >= s.spec.accepted_per_pos[-1]
    if num_blocks == 16:
        assert s.num_preemptions > 0


def test_a_stop_token_among_kept_drafts_ends_the_request_there() -> None:
    def model(tokens: list[int], seed: int | None) -> int:  # copies, and says EOS at length 30
        return EOS if len(tokens) == 30 else copying_model(tokens, seed)

    s = make()
    prompt = prompts(3)[2]
    s.add_request(Request("a", prompt, SamplingParams(max_tokens=50), "tok", 50))
    outputs, _ = drain(s, SimWorker(64, 4, model), 1)
    assert outputs["a"] == reference_output(prompt, None, 50, 256, model=model)
    assert outputs["a"][-1] == EOS and len(prompt) + len(outputs["a"]) == 31


def test_no_drafts_for_a_large_batch_or_sampling_that_reads_more_than_the_distribution() -> None:
    s = make(spec=SpeculativeConfig.parse('{"num_speculative_tokens": 3, "disable_by_batch_size": 2}'))
    for i, p in enumerate(prompts(3)):
        s.add_request(request(f"r{i}", p, 12))
    _, plans = drain(s, SimWorker(64, 4, copying_model), 1)
    busy = [p for p in plans if len(p.num_scheduled_tokens) > 2]
    assert busy and not any(p.spec_token_ids for p in busy)

    s = make()
    for i, sp in enumerate([dict(logprobs=2), dict(seed=3), dict(repetition_penalty=1.2), dict(min_tokens=10)]):
        s.add_request(request(f"r{i}", prompts(2)[1], 30, **sp))
    _, plans = drain(s, SimWorker(64, 4, copying_model), 1)
    drafted = {rid for p in plans for rid in p.spec_token_ids}
    assert "r0" not in drafted and "r1" not in drafted and "r2" not in drafted
    assert "r3" in drafted  # once its 10 tokens are out: not in its prefill and first 10 steps
    assert not any("r3" in p.spec_token_ids for p in plans[:11])


def test_bad_speculative_configs_name_the_field() -> None:
    for text, words in [('{"method": "eagle"}', "method 'eagle'"), ('{"num_speculative_tokens": 0}', "at least 1"),
                        ('{"prompt_lookup_min": 5, "prompt_lookup_max": 2}', "prompt_lookup_min"),
                        ('{"bogus": 1}', "bogus")]:
        with pytest.raises(ValueError, match="speculative_config") as e:
            SpeculativeConfig.parse(text)
        assert words in str(e.value)


# ---- draft-model speculation: the scheduler's side, with a simulated draft worker ------------

DRAFT_SPEC = SpeculativeConfig.parse('{"method": "draft_model", "model": "draft", "num_speculative_tokens": 3}')


class SimDraftWorker:
    """A draft worker whose cache holds token ids: every position the scheduler says it holds
    (a request's num_computed_tokens) must hold that request's token there, through the block
    table, so a wrong catch-up count or a block the draft never wrote is caught. It proposes what
    `model` would, which agrees with the target except at every 4th position."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.num_plans = 0
        self.num_held = 0  # positions found in the cache (not computed again)

    @staticmethod
    def model(tokens: list[int], seed: int | None) -> int:
        return copying_model(tokens, seed) if len(tokens) % 4 else 1 + len(tokens) % (VOCAB - 1)

    def _slot(self, blocks: list[int], pos: int) -> tuple[int, int]:
        return blocks[pos // self.block_size], pos % self.block_size

    def propose(self, plan: DraftPlan) -> DraftResult:
        self.num_plans += 1
        drafts = {}
        for q in plan.requests:
            tokens = list(q.token_ids)
            self.num_held += q.num_computed_tokens
            for pos in range(q.num_computed_tokens):
                b, o = self._slot(q.block_ids, pos)
                assert self.kv[b][o] == tokens[pos], f"{q.request_id}: position {pos} is not in the draft's cache"
            for pos in range(q.num_computed_tokens, len(tokens)):
                b, o = self._slot(q.block_ids, pos)
                self.kv[b][o] = tokens[pos]
            out = []
            for i in range(q.num_drafts):
                out.append(self.model(tokens, None))
                tokens.append(out[-1])
                if i < q.num_drafts - 1:  # the last draft is proposed, never computed
                    b, o = self._slot(q.block_ids, len(tokens) - 1)
                    self.kv[b][o] = tokens[-1]
            drafts[q.request_id] = out
        return DraftResult(plan.step_id, drafts)


@pytest.mark.parametrize("depth", [1, 2], ids=["sync", "async"])
@pytest.mark.parametrize("num_blocks", [64, 16], ids=["roomy", "preempting"])
def test_draft_model_drafts_keep_each_requests_tokens_and_the_drafts_cache_count(depth, num_blocks) -> None:
    s = make(num_blocks, DRAFT_SPEC)
    worker, drafter = SimWorker(num_blocks, 4, copying_model), SimDraftWorker(num_blocks, 4)
    # No draft worker ready: plain steps only.
    s.add_request(request("early", prompts(1)[0], 5))
    early, plans = drain(s, worker, depth)
    assert not any(p.spec_token_ids for p in plans)
    s.draft_max_model_len = 256
    lengths = [40, 23, 31, 17]
    for i, (p, n) in enumerate(zip(prompts(4), lengths)):
        s.add_request(request(f"r{i}", p, n))
    outputs: dict[str, list[int]] = {}
    in_flight: deque = deque()
    num_plans = 0
    while s.has_work or in_flight:
        while len(in_flight) < depth and (plan := s.schedule()) is not None:
            if s.needs_drafts(plan):
                num_plans += 1
                # Every 5th plan the draft worker "died": the plan goes out without drafts.
                result = drafter.propose(s.draft_plan(plan)) if num_plans % 5 else DraftResult(plan.step_id, {})
                s.fill_drafts(plan, result.drafts)
                assert not s.needs_drafts(plan)
                for rid, d in plan.spec_token_ids.items():
                    assert plan.num_scheduled_tokens[rid] == 1 + len(d)
            in_flight.append(plan)
        for _, out in s.update(worker.execute(in_flight.popleft())).outputs:
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert s.block_pool.num_free == s.block_pool.num_blocks and not s.requests
    for i, (p, n) in enumerate(zip(prompts(4), lengths)):
        assert outputs[f"r{i}"] == reference_output(p, None, n, 256, ignore_eos=True, model=copying_model)
    assert drafter.num_plans > 5 and drafter.num_held > 10 * drafter.num_plans  # mostly caught up already
    assert 0 < s.spec.num_accepted_tokens < s.spec.num_draft_tokens
    if num_blocks == 16:
        assert s.num_preemptions > 0
