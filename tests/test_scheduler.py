"""The scheduler and block pool on their own: batching, budgets, stops, preemption, leaks."""

import pytest

from protocol import SamplingParams, StepResult
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import Scheduler, SchedulerConfig


def make_scheduler(**kw) -> Scheduler:
    cfg = dict(num_blocks=64, block_size=16, max_model_len=1024, max_num_seqs=8,
               max_num_batched_tokens=256, eos_token_ids=[2])
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))


def make_request(rid: str, prompt_len: int, max_tokens: int = 8, **sp) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, **sp),
                   "tokenizer-0", max_tokens)


def run_step(s: Scheduler, token: int = 7):
    """Schedule one step and answer it as a worker would: a token for each finished prefill."""
    plan = s.schedule()
    assert plan is not None
    done = [rid for rid, n in plan.num_scheduled_tokens.items()
            if s.requests[rid].num_computed_tokens == s.requests[rid].num_tokens]
    update = s.update(StepResult(plan.step_id, done, [token] * len(done)))
    return plan, update


def assert_pool_consistent(s: Scheduler) -> None:
    held: dict[int, int] = {}
    for req in s.requests.values():
        for b in req.block_ids:
            held[b] = held.get(b, 0) + 1
    for b in range(s.block_pool.num_blocks):
        assert s.block_pool.ref_counts[b] == held.get(b, 0)
    assert s.block_pool.num_free == s.block_pool.num_blocks - len(held)


def test_block_pool_refcounts_and_double_free():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.share(a)
    pool.free(a)
    assert pool.num_free == 2
    pool.free(a)
    assert pool.num_free == 4
    with pytest.raises(AssertionError):
        pool.free(a)


def test_requests_join_and_leave_the_running_batch_every_step():
    s = make_scheduler()
    s.add_request(make_request("a", 20, max_tokens=3))
    plan, _ = run_step(s)
    assert plan.num_scheduled_tokens == {"a": 20}
    s.add_request(make_request("b", 5, max_tokens=3))
    plan, _ = run_step(s)
    # a decodes one token while b prefills, in the same step
    assert plan.num_scheduled_tokens == {"a": 1, "b": 5}
    assert [r.request_id for r in plan.new_requests] == ["b"]
    plan, update = run_step(s)
    assert update.finished[0].request_id == "a" and update.finished[0].status is RequestStatus.FINISHED_LENGTH
    plan, _ = run_step(s)
    assert plan.finished_request_ids == ["a"]
    assert plan.num_scheduled_tokens == {"b": 1}
    assert_pool_consistent(s)


def test_long_prompt_is_chunked_within_the_token_budget():
    s = make_scheduler(max_num_batched_tokens=32)
    s.add_request(make_request("long", 70))
    sizes = []
    while s.requests["long"].num_computed_tokens < 70:
        plan, update = run_step(s)
        sizes.append(plan.num_scheduled_tokens["long"])
    assert sizes == [32, 32, 6]
    assert s.requests["long"].output_token_ids == [7]
    assert len(s.requests["long"].block_ids) == 5


def test_max_num_seqs_is_never_exceeded():
    s = make_scheduler(max_num_seqs=3)
    for i in range(5):
        s.add_request(make_request(f"r{i}", 4))
    plan, _ = run_step(s)
    assert len(plan.num_scheduled_tokens) == 3 and s.num_waiting == 2


def test_eos_stops_unless_ignored_and_min_tokens():
    s = make_scheduler()
    s.add_request(make_request("stop", 4, max_tokens=10))
    s.add_request(make_request("ignore", 4, max_tokens=10, ignore_eos=True))
    s.add_request(make_request("min", 4, max_tokens=10, min_tokens=2))
    _, update = run_step(s, token=2)
    assert [r.request_id for r in update.finished] == ["stop"]
    assert [o.finish_reason for _, o in update.outputs] == ["stop", None, None]
    _, update = run_step(s, token=2)
    assert [r.request_id for r in update.finished] == ["min"]


def test_preemption_frees_the_newest_and_it_resumes_with_all_its_tokens():
    s = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    s.add_request(make_request("old", 8, max_tokens=6))
    s.add_request(make_request("new", 8, max_tokens=6))
    run_step(s)  # both prefilled: 2 blocks each, pool full
    assert s.block_pool.num_free == 0
    plan, _ = run_step(s)  # each needs a 3rd block at position 8: "new" is preempted
    assert s.num_preemptions == 1
    assert s.requests["new"].status is RequestStatus.PREEMPTED
    assert plan.num_scheduled_tokens == {"old": 1}
    assert_pool_consistent(s)
    while s.requests.get("old") is not None:
        run_step(s)
    plan, _ = run_step(s)
    assert "new" in plan.finished_request_ids or "new" in [r.request_id for r in plan.new_requests]
    resumed = [r for r in plan.new_requests if r.request_id == "new"]
    assert resumed and len(resumed[0].prompt_token_ids) == 8 + 1
    assert_pool_consistent(s)


def test_abort_frees_blocks_and_tells_the_worker():
    s = make_scheduler()
    s.add_request(make_request("a", 40))
    run_step(s)
    s.abort(["a", "unknown"])
    assert s.block_pool.num_free == 64
    plan = s.schedule()
    assert plan is not None and plan.finished_request_ids == ["a"] and not plan.num_scheduled_tokens
    assert s.schedule() is None


def test_result_for_an_aborted_request_is_ignored():
    s = make_scheduler()
    s.add_request(make_request("a", 4))
    plan = s.schedule()
    s.abort(["a"])
    update = s.update(StepResult(plan.step_id, ["a"], [5]))
    assert update.outputs == [] and update.finished == []
