"""Prompt logprobs in the scheduler: no prefix-cache hit for the requests asking, the worker's
chunks joined in prompt order (once each, across a preemption), and the whole prompt's sent
with sample 0's first output only."""

from __future__ import annotations

from protocol import SamplingParams, StepPlan, StepResult, TokenOutput
from protocol.messages import PromptLogprobs
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerConfig

PROMPT = list(range(10, 60))  # 50 tokens: 3 full blocks of 16


def make_scheduler(**kw: int) -> Scheduler:
    cfg = dict(num_blocks=64, block_size=16, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=256,
               eos_token_ids=[2])
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))


def request(rid: str, prompt_logprobs: int | None = 2, n: int = 1, max_tokens: int = 4) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, prompt_logprobs=prompt_logprobs, n=n, ignore_eos=True)
    return Request(rid, list(PROMPT), sampling, "tokenizer-0", max_tokens)


def fake_chunk(start: int, end: int, num_prompt: int) -> PromptLogprobs | None:
    """What the worker returns for positions [start, end): entry about token t has logprob -t."""
    last = min(end, num_prompt - 1)
    if last <= start:
        return None
    tokens = range(start + 1, last + 1)
    return PromptLogprobs(start + 1, [-float(t) for t in tokens], [t for t in tokens], [[t, 0] for t in tokens],
                          [[-float(t), -99.0] for t in tokens])


class FakeWorker:
    """Answers plans as the runner does: a token for each request whose known tokens are all
    computed, and a prompt-logprobs chunk for each prompt chunk of a request that asks."""

    def __init__(self) -> None:
        self.asks: dict[str, int] = {}  # request id -> prompt length, for requests computing them

    def run(self, s: Scheduler, plan: StepPlan) -> list[TokenOutput]:
        for rid in plan.finished_request_ids:
            self.asks.pop(rid, None)
        starts = {c.request_id: c.num_computed_tokens for c in plan.cached_requests}
        for new in plan.new_requests:
            starts[new.request_id] = new.num_computed_tokens
            self.asks.pop(new.request_id, None)
            if new.sampling.prompt_logprobs is not None and new.num_output_tokens == 0:
                self.asks[new.request_id] = len(new.prompt_token_ids)
        chunks = {}
        for rid, n in plan.num_scheduled_tokens.items():
            if rid in self.asks and (chunk := fake_chunk(starts[rid], starts[rid] + n, self.asks[rid])) is not None:
                chunks[rid] = chunk
        # One step at a time: a placeholder means this step samples the request's next token.
        done = [rid for rid in plan.num_scheduled_tokens if s.requests[rid].num_output_placeholders > 0]
        result = StepResult(plan.step_id, done, [7] * len(done), prompt_logprobs=chunks or None)
        return [out for _, out in s.update(result).outputs]


def run(s: Scheduler, worker: FakeWorker, steps: int = 100) -> list[TokenOutput]:
    outputs = []
    for _ in range(steps):
        plan = s.schedule()
        if plan is None:
            break
        outputs += worker.run(s, plan)
    return outputs


def assert_whole_prompt(prompt: PromptLogprobs | None, num_prompt: int = len(PROMPT)) -> None:
    assert prompt is not None and prompt.first == 1
    assert prompt.token_logprobs == [-float(t) for t in range(1, num_prompt)]
    assert prompt.top_token_ids == [[t, 0] for t in range(1, num_prompt)]


def test_no_prefix_cache_hit_for_a_request_asking_but_its_blocks_are_published() -> None:
    s, worker = make_scheduler(), FakeWorker()
    s.add_request(request("plain", prompt_logprobs=None))
    run(s, worker)
    queries = s.kv.num_queries
    s.add_request(request("asks"))
    plan = s.schedule()
    assert plan is not None and plan.new_requests[0].num_computed_tokens == 0
    assert plan.num_scheduled_tokens == {"asks": 50}
    assert s.kv.num_queries == queries  # not counted as a lookup: none was made
    worker.run(s, plan)
    run(s, worker)
    # A plain request after it hits the blocks it computed (and the first one's).
    s.add_request(request("later", prompt_logprobs=None))
    plan = s.schedule()
    assert plan is not None and plan.new_requests[0].num_computed_tokens == 48


def test_chunks_are_joined_and_sent_with_the_first_output_only() -> None:
    s, worker = make_scheduler(max_num_batched_tokens=16), FakeWorker()
    s.add_request(request("a"))
    outputs = run(s, worker)
    assert [len(o.new_token_ids) for o in outputs] == [1, 1, 1, 1]
    assert_whole_prompt(outputs[0].prompt_logprobs)
    assert all(o.prompt_logprobs is None for o in outputs[1:])
    assert not s.requests  # finished, nothing held


def test_a_prompt_recomputed_after_a_preemption_adds_nothing_twice() -> None:
    s, worker = make_scheduler(max_num_batched_tokens=16), FakeWorker()
    s.add_request(request("a"))
    for _ in range(2):  # 32 of the 50 prompt tokens computed, their chunks joined
        plan = s.schedule()
        assert plan is not None
        worker.run(s, plan)
    assert len(s.requests["a"].prompt_logprobs.token_logprobs) == 32
    s.reset_worker()  # the worker restarted: recompute from the tokens (no cache: from position 0)
    outputs = run(s, worker)
    assert_whole_prompt(outputs[0].prompt_logprobs)


def test_only_sample_0_computes_and_sends_them() -> None:
    s, worker = make_scheduler(), FakeWorker()
    s.add_request(request("p", n=3))
    assert [r.sampling.prompt_logprobs for r in s.samples["p"]] == [2, None, None]
    outputs = run(s, worker)
    with_prompt = [o for o in outputs if o.prompt_logprobs is not None]
    assert [o.index for o in with_prompt] == [0]
    assert_whole_prompt(with_prompt[0].prompt_logprobs)


def test_a_request_resumed_with_outputs_reads_the_cache_and_sends_none() -> None:
    """Re-submitted to a restarted scheduler after its first output: its prompt logprobs were sent."""
    s, worker = make_scheduler(), FakeWorker()
    s.add_request(request("plain", prompt_logprobs=None))
    run(s, worker)
    s.add_request(request("resumed"), outputs_so_far=[[7, 7]])
    plan = s.schedule()
    assert plan is not None and plan.new_requests[0].num_computed_tokens == 48
    outputs = worker.run(s, plan) + run(s, worker)
    assert outputs and all(o.prompt_logprobs is None for o in outputs)


def test_a_one_token_prompt_gets_an_empty_run() -> None:
    s, worker = make_scheduler(), FakeWorker()
    s.add_request(Request("one", [42], SamplingParams(max_tokens=1, prompt_logprobs=0), "tokenizer-0", 1))
    [out] = run(s, worker)
    assert out.prompt_logprobs == PromptLogprobs(1, [], [], [], [])
