"""The scheduler on its own: batching, budgets, stops, preemption, leaks, prefix caching,
parallel samples and async scheduling (tests/scheduler/sim_worker.py plays the worker)."""

from collections import deque

import pytest

from protocol import SamplingParams, StepResult
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.sim_worker import SimWorker, next_token, reference_output


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
    s = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64, enable_prefix_caching=False)
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


# ---- prefix caching --------------------------------------------------------------------


def drain(s: Scheduler, worker: SimWorker, depth: int = 1) -> dict[tuple[str, int], list[int]]:
    """Run steps (up to `depth` in flight) until no work is left; the tokens each sample got."""
    outputs: dict[tuple[str, int], list[int]] = {}
    in_flight: deque = deque()
    while s.has_work or in_flight:
        while len(in_flight) < depth and (plan := s.schedule()) is not None:
            in_flight.append(plan)
        for _, out in s.update(worker.execute(in_flight.popleft())).outputs:
            outputs.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
        assert_pool_consistent(s)
    return outputs


def test_a_request_sharing_a_prefix_reuses_its_full_blocks_and_computes_only_the_rest():
    s, worker = make_scheduler(), SimWorker(64, 16)
    s.add_request(make_request("a", 50, max_tokens=2))
    plan = s.schedule()
    a_blocks = list(s.requests["a"].block_ids)
    s.update(worker.execute(plan))
    s.add_request(Request("b", list(range(10, 50)) + [99] * 5, SamplingParams(max_tokens=2), "tok", 2))
    plan = s.schedule()
    (new,) = plan.new_requests
    assert new.num_computed_tokens == 32 and new.block_ids[:2] == a_blocks[:2]
    assert plan.num_scheduled_tokens["b"] == 45 - 32
    assert s.block_pool.ref_counts[a_blocks[0]] == 2  # a, still running, and b hold it
    assert (s.kv.num_queries, s.kv.num_hits) == (50 + 45, 32)
    s.update(worker.execute(plan))  # the worker finds b's prefix in a's blocks
    drain(s, worker)
    assert s.block_pool.num_free == 64 and len(s.block_pool.cached) == 3  # b's full blocks are a's


def test_requests_arriving_together_share_the_prefix_computed_in_the_same_step():
    s, worker = make_scheduler(), SimWorker(64, 16)
    s.add_request(make_request("a", 40, max_tokens=2))
    s.add_request(make_request("b", 45, max_tokens=2))
    plan = s.schedule()
    assert [r.num_computed_tokens for r in plan.new_requests] == [0, 32]
    assert plan.num_scheduled_tokens == {"a": 40, "b": 13}
    s.update(worker.execute(plan))  # b reads a's K/V, written earlier in the same layer
    drain(s, worker)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    for prompt_len, expected_hit in [(48, 32), (49, 48)]:
        s, worker = make_scheduler(), SimWorker(64, 16)
        s.add_request(make_request("a", prompt_len, max_tokens=1))
        drain(s, worker)
        s.add_request(make_request("b", prompt_len, max_tokens=1))
        plan = s.schedule()
        assert plan.new_requests[0].num_computed_tokens == expected_hit
        assert plan.num_scheduled_tokens["b"] == prompt_len - expected_hit


def test_with_prefix_caching_off_nothing_is_cached_or_counted():
    s, worker = make_scheduler(enable_prefix_caching=False), SimWorker(64, 16)
    s.add_request(make_request("a", 40, max_tokens=1))
    drain(s, worker)
    s.add_request(make_request("b", 40, max_tokens=1))
    assert s.schedule().new_requests[0].num_computed_tokens == 0
    assert not s.block_pool.cached and s.kv.num_queries == s.kv.num_hits == 0


def test_a_preempted_request_resumes_from_its_own_cached_blocks():
    s, worker = make_scheduler(num_blocks=6, block_size=4, max_model_len=24), SimWorker(6, 4)
    s.add_request(make_request("old", 8, max_tokens=12, ignore_eos=True))
    s.add_request(Request("new", list(range(50, 58)), SamplingParams(max_tokens=12, ignore_eos=True), "tok", 12))
    resumed = []
    while s.has_work:
        plan = s.schedule()
        resumed += [r for r in plan.new_requests if r.request_id == "new" and s.requests["new"].num_preemptions]
        s.update(worker.execute(plan))
        assert_pool_consistent(s)
    assert s.num_preemptions >= 1
    assert resumed and resumed[0].num_computed_tokens >= 4


# ---- parallel sampling (n > 1) ---------------------------------------------------------


def test_parallel_samples_share_the_prompt_blocks_and_copy_the_partial_one():
    s, worker = make_scheduler(), SimWorker(64, 16)
    s.add_request(Request("p", list(range(10, 50)), SamplingParams(n=3, max_tokens=4, seed=5), "tok", 4))
    plan = s.schedule()
    assert plan.num_scheduled_tokens == {"p#0": 40}  # the prompt is computed once
    update = s.update(worker.execute(plan))
    assert [(o.request_id, o.index) for _, o in update.outputs] == [("p", 0)]
    plan = s.schedule()
    leader = s.requests["p#0"].block_ids
    assert plan.num_scheduled_tokens == {"p#0": 1, "p#1": 1, "p#2": 1}
    for new in plan.new_requests:
        assert new.num_computed_tokens == 39 and new.block_ids[:2] == leader[:2]
    assert [r.sampling.seed for r in plan.new_requests] == [6, 7]  # sample i: seed + i
    # Copy-on-write: each sample gets its own copy of the block holding prompt tokens 32..38.
    assert plan.block_copies == [(leader[2], r.block_ids[2]) for r in plan.new_requests]
    assert s.block_pool.ref_counts[leader[0]] == 3
    update = s.update(worker.execute(plan))  # the worker checks each sample reads the prompt
    assert sorted((o.request_id, o.index) for _, o in update.outputs) == [("p", 0), ("p", 1), ("p", 2)]
    drain(s, worker)
    assert s.block_pool.num_free == 64 and not s.samples


def test_parallel_samples_end_with_what_each_generates_alone():
    prompt = list(range(10, 42))  # the last prompt token starts a block: no copy needed
    s, worker = make_scheduler(), SimWorker(64, 16)
    s.add_request(Request("p", prompt, SamplingParams(n=3, max_tokens=6, seed=1, ignore_eos=True), "tok", 6))
    outputs = drain(s, worker, depth=2)
    assert outputs == {("p", i): reference_output(prompt, 1 + i, 6, 1024, ignore_eos=True) for i in range(3)}


def test_abort_stops_one_sample_or_all_of_them():
    s, worker = make_scheduler(), SimWorker(64, 16)
    s.add_request(Request("p", list(range(10, 30)), SamplingParams(n=3, max_tokens=8), "tok", 8))
    for _ in range(2):
        s.update(worker.execute(s.schedule()))
    assert [r.request_id for r in s.abort(["p"], [1])] == ["p#1"]
    assert sorted(s.requests) == ["p#0", "p#2"]
    assert [r.request_id for r in s.abort(["p"])] == ["p#0", "p#2"]
    assert not s.requests and not s.samples and s.block_pool.num_free == 64
    assert sorted(s.schedule().finished_request_ids) == ["p#0", "p#1", "p#2"]


def test_samples_whose_leader_finished_first_compute_the_prompt_themselves():
    s, worker = make_scheduler(enable_prefix_caching=False), SimWorker(64, 16)
    s.add_request(Request("p", list(range(10, 30)), SamplingParams(n=2, max_tokens=1, seed=0), "tok", 1))
    s.update(worker.execute(s.schedule()))  # the leader samples its only token and finishes
    plan = s.schedule()
    assert [(r.request_id, r.num_computed_tokens) for r in plan.new_requests] == [("p#1", 0)]
    outputs = {("p", 1): [t for _, o in s.update(worker.execute(plan)).outputs for t in o.new_token_ids]}
    assert outputs[("p", 1)] == reference_output(list(range(10, 30)), 1, 1, 1024)


# ---- async scheduling ------------------------------------------------------------------


def test_the_next_step_decodes_a_token_that_is_not_back_yet():
    s = make_scheduler()
    s.add_request(make_request("a", 5, max_tokens=4))
    first, second = s.schedule(), s.schedule()
    assert first.num_scheduled_tokens == {"a": 5} and second.num_scheduled_tokens == {"a": 1}
    assert second.cached_requests[0].num_computed_tokens == 5
    assert s.requests["a"].num_output_placeholders == 2


def test_a_stop_found_a_step_late_never_reaches_the_tokenizer():
    s = make_scheduler()
    s.add_request(make_request("a", 5, max_tokens=4))
    first, second = s.schedule(), s.schedule()
    update = s.update(StepResult(first.step_id, ["a"], [2]))  # EOS
    assert [o.finish_reason for _, o in update.outputs] == ["stop"]
    assert s.update(StepResult(second.step_id, ["a"], [7])).outputs == []
    assert s.schedule().finished_request_ids == ["a"]
    assert s.block_pool.num_free == 64


def test_no_step_is_planned_past_the_length_limit_in_flight():
    s = make_scheduler(max_model_len=16)
    s.add_request(make_request("a", 5, max_tokens=2))
    s.add_request(make_request("b", 14, max_tokens=8))
    s.schedule()
    second = s.schedule()
    assert second.num_scheduled_tokens == {"a": 1, "b": 1}
    assert s.schedule() is None  # a has 2 tokens in flight, b reaches 16 with 2


def test_tokens_in_flight_when_preempted_are_dropped_and_recomputed():
    s, worker = make_scheduler(num_blocks=6, block_size=4, max_model_len=24), SimWorker(6, 4)
    prompts = {"a": list(range(10, 18)), "b": list(range(30, 38)), "c": list(range(50, 56))}
    for rid, p in prompts.items():
        s.add_request(Request(rid, p, SamplingParams(max_tokens=14, ignore_eos=True), "tok", 14))
    outputs = drain(s, worker, depth=2)
    assert s.num_preemptions > 0
    assert outputs == {(rid, 0): reference_output(p, None, 14, 24, ignore_eos=True) for rid, p in prompts.items()}


def test_a_restarted_worker_gets_every_request_again_and_no_stale_cache():
    s, worker = make_scheduler(), SimWorker(64, 16)
    s.add_request(make_request("a", 40, max_tokens=8))
    s.update(worker.execute(s.schedule()))
    s.schedule()  # in flight when the worker dies
    s.reset_worker()
    assert not s.block_pool.cached and s.block_pool.num_free == 64
    plan = s.schedule()
    assert plan.finished_request_ids == []
    assert [(r.request_id, r.num_computed_tokens, len(r.prompt_token_ids)) for r in plan.new_requests] == [("a", 0, 41)]
    # Its one output counts as an output, not a prompt token: seeds and penalties go on from it.
    assert plan.new_requests[0].num_output_tokens == 1
    update = s.update(SimWorker(64, 16).execute(plan))
    assert [o.new_token_ids for _, o in update.outputs] == [[next_token(s.requests["a"].all_token_ids[:41], None)]]


# ---- re-submitted after a scheduler restart ----------------------------------------------


def test_a_request_resubmitted_with_its_outputs_so_far_ends_as_if_never_interrupted():
    prompt = list(range(10, 30))
    full = reference_output(prompt, 3, 10, 1024, ignore_eos=True)
    s, worker = make_scheduler(), SimWorker(64, 16)
    s.add_request(Request("a", prompt, SamplingParams(max_tokens=10, seed=3, ignore_eos=True), "tok", 10), [full[:4]])
    plan = s.schedule()
    # Recomputed as after a preemption: prompt and outputs, the outputs counted as such.
    (new,) = plan.new_requests
    assert new.prompt_token_ids == prompt + full[:4] and new.num_output_tokens == 4
    assert plan.num_scheduled_tokens == {"a": 24}
    outputs = [t for _, o in s.update(worker.execute(plan)).outputs for t in o.new_token_ids]
    outputs += drain(s, worker)[("a", 0)]
    assert outputs == full[4:]  # max_tokens counts the 4 it had
    assert s.block_pool.num_free == 64


def test_a_resubmitted_parallel_request_runs_its_unfinished_samples_each_from_its_own_outputs():
    prompt = list(range(10, 42))
    ref = [reference_output(prompt, 1 + i, 6, 1024, ignore_eos=True) for i in range(3)]
    s, worker = make_scheduler(), SimWorker(64, 16)
    req = Request("p", prompt, SamplingParams(n=3, max_tokens=6, seed=1, ignore_eos=True), "tok", 6)
    s.add_request(req, [ref[0], ref[1][:2], []], {0: "length"})
    assert [r.status.value for r in s.adopt("p", "tok")] == ["length", "waiting", "waiting"]
    assert drain(s, worker) == {("p", 1): ref[1][2:], ("p", 2): ref[2]}
    assert not s.requests and not s.samples and s.block_pool.num_free == 64


def test_a_resubmitted_request_whose_outputs_reach_max_tokens_is_refused():
    s = make_scheduler()
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request(make_request("a", 5, max_tokens=3), [[7, 7, 7]])
    assert not s.requests and not s.waiting
