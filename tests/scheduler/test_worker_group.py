"""Worker groups (data parallel): where a new request goes, and a lost group's requests moving
to another group's scheduler, which ends them with the tokens they would have had."""

from __future__ import annotations

from protocol import Hello, SamplingParams
from scheduler_svc.request import Request
from scheduler_svc.worker_group import BALANCE_SLACK, WorkerGroup, place, take_live
from tests.scheduler.sim_worker import SimWorker, reference_output
from tests.scheduler.test_scheduler import drain, make_scheduler


def serving_group(group_id: int) -> WorkerGroup:
    g = WorkerGroup(group_id, 1)
    g.workers[0] = f"worker-{group_id}"
    g.rank0_hello = Hello(role="worker", member_id=g.workers[0], pid=1)
    g.scheduler = make_scheduler()
    return g


def request(rid: str, prompt: list[int], max_tokens: int = 6, **sp) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sp), "tok", max_tokens)


def test_a_request_goes_to_its_longest_prefix_hit_then_the_least_loaded_then_the_lowest_id():
    a, b = serving_group(0), serving_group(1)
    shared = list(range(10, 42))  # two full blocks
    # b computed the shared prefix: a request starting with it goes there.
    b.scheduler.add_request(request("warm", shared + [5]))
    drain(b.scheduler, SimWorker(64, 16))
    assert b.cached_tokens(request("x", shared + [6, 7])) == 32 and a.cached_tokens(request("x", shared)) == 0
    assert place([a, b], request("x", shared + [6, 7])) is b
    # No hit anywhere: the least loaded, and on a tie the lowest id.
    assert place([a, b], request("y", [3] * 20)) is a
    a.scheduler.add_request(request("y", [3] * 20))
    assert place([a, b], request("z", [4] * 20)) is b


def test_a_prefix_hit_does_not_pile_requests_onto_one_group():
    a, b = serving_group(0), serving_group(1)
    shared = list(range(10, 42))
    b.scheduler.add_request(request("warm", shared + [5]))
    drain(b.scheduler, SimWorker(64, 16))
    placed = []
    for i in range(12):
        group = place([a, b], req := request(f"r{i}", shared + [i]))
        group.scheduler.add_request(req)
        placed.append(group.group_id)
    # b takes them while it holds at most BALANCE_SLACK (or twice) more than a; then a does.
    assert placed[: BALANCE_SLACK + 1] == [1] * (BALANCE_SLACK + 1) and 0 in placed
    assert abs(a.load - b.load) <= max(BALANCE_SLACK, min(a.load, b.load)) + 1


def test_a_lost_groups_requests_end_on_another_group_with_the_tokens_they_would_have_had():
    lost, other = serving_group(0), serving_group(1)
    prompts = {"greedy": list(range(10, 30)), "seeded": list(range(40, 61)), "pair": list(range(5, 25))}
    lost.scheduler.add_request(request("greedy", prompts["greedy"], 12))
    lost.scheduler.add_request(request("seeded", prompts["seeded"], 12, seed=5, temperature=1.0))
    lost.scheduler.add_request(request("pair", prompts["pair"], 12, n=2, seed=9, temperature=1.0))
    worker = SimWorker(64, 16)
    got: dict[tuple[str, int], list[int]] = {}
    for _ in range(5):  # a few steps, then the group is lost mid-way
        for _, out in lost.scheduler.update(worker.execute(lost.scheduler.schedule())).outputs:
            got.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
    lost.scheduler.reset_worker()
    live = take_live(lost.scheduler)
    assert sorted(r.request_id for r, _, _ in live) == ["greedy", "pair", "seeded"]
    for req, outputs, finished in live:
        assert outputs == [got.get((req.request_id, i), []) for i in range(req.sampling.n)] and not finished
        other.scheduler.add_request(req, outputs, finished)
    for key, tokens in drain(other.scheduler, SimWorker(64, 16)).items():
        got[key] = got.get(key, []) + tokens
    # The sim worker's "model" is deterministic per context and seed: every sample ends as it
    # would have alone (a sample's seed is its request's seed plus its index).
    assert got[("greedy", 0)] == reference_output(prompts["greedy"], None, 12, 1024, ignore_eos=True)
    assert got[("seeded", 0)] == reference_output(prompts["seeded"], 5, 12, 1024, ignore_eos=True)
    for i in range(2):
        assert got[("pair", i)] == reference_output(prompts["pair"], 9 + i, 12, 1024, ignore_eos=True)
