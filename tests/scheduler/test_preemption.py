"""Preemption on its own: who gives up blocks, and what a preempted request forgets and keeps."""

from protocol import SamplingParams
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.preemption import allocate_or_preempt
from scheduler_svc.request import Request, RequestStatus

BLOCK = 4


def running_request(kv: KVCacheManager, rid: str, num_tokens: int) -> Request:
    req = Request(rid, list(range(100, 100 + num_tokens)), SamplingParams(max_tokens=8), "tokenizer-0", 8)
    assert kv.allocate_slots(req, num_tokens) is not None
    req.num_computed_tokens = num_tokens
    req.status = RequestStatus.RUNNING
    return req


def test_the_newest_running_requests_give_their_blocks_until_the_oldest_fits() -> None:
    kv = KVCacheManager(6, BLOCK, enable_caching=False, extra_keys=("m", None))
    old, mid, new = (running_request(kv, rid, 2 * BLOCK) for rid in ("old", "mid", "new"))
    running = [old, mid, new]
    old.output_token_ids = list(range(9))  # 17 tokens known: 3 more blocks, more than one victim frees
    blocks, preempted = allocate_or_preempt(kv, running, old, 9)
    assert preempted == [new, mid]  # newest first
    assert running == [old]
    assert blocks is not None and len(blocks) == 3 and old.block_ids[-3:] == blocks
    for req in preempted:
        assert req.status is RequestStatus.PREEMPTED and req.num_preemptions == 1
        assert req.block_ids == [] and req.num_computed_tokens == 0
        assert len(req.all_token_ids) == 2 * BLOCK  # its tokens are kept: it is recomputed from them
    assert kv.pool.num_free == 1


def test_only_as_many_are_preempted_as_the_blocks_need() -> None:
    kv = KVCacheManager(6, BLOCK, enable_caching=False, extra_keys=("m", None))
    old, mid, new = (running_request(kv, rid, 2 * BLOCK) for rid in ("old", "mid", "new"))
    running = [old, mid, new]
    old.output_token_ids = list(range(5))  # 13 tokens known: 2 more blocks, one victim's worth
    _, preempted = allocate_or_preempt(kv, running, old, 5)
    assert preempted == [new] and running == [old, mid]
    assert mid.status is RequestStatus.RUNNING and len(mid.block_ids) == 2


def test_a_request_that_is_itself_the_newest_preempts_itself() -> None:
    kv = KVCacheManager(2, BLOCK, enable_caching=False, extra_keys=("m", None))
    old, new = running_request(kv, "old", BLOCK), running_request(kv, "new", BLOCK)
    running = [old, new]
    new.output_token_ids = [1]
    blocks, preempted = allocate_or_preempt(kv, running, new, 1)
    assert blocks is None and preempted == [new] and running == [old]
    assert kv.pool.num_free == 1  # its block is free; the older request keeps its own


def test_tokens_in_flight_when_preempted_become_stale() -> None:
    kv = KVCacheManager(2, BLOCK, enable_caching=False, extra_keys=("m", None))
    old, new = running_request(kv, "old", BLOCK), running_request(kv, "new", BLOCK)
    new.num_output_placeholders = 2  # two steps in flight sample for it
    old.output_token_ids = [1]
    _, preempted = allocate_or_preempt(kv, [old, new], old, 1)
    assert preempted == [new]
    assert new.num_output_placeholders == 0 and new.num_stale_tokens == 2
