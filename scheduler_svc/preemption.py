"""Preemption by recompute (vLLM's default): when a running request needs a KV block and none is
free, the newest running request gives all its blocks back and waits to be computed again.

Nothing is lost: the scheduler owns every request's tokens (prompt and outputs), so a preempted
request returns to the worker as new, carrying them all, and with prefix caching usually finds
its own blocks still cached. Victims are taken from the newest end of the running list, so the
oldest requests, which hold the most work, keep running.
"""

from __future__ import annotations

from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.request import Request, RequestStatus


def allocate_or_preempt(
    kv: KVCacheManager, running: list[Request], req: Request, num_new: int
) -> tuple[list[int] | None, list[Request]]:
    """Blocks for `req`'s next `num_new` tokens, and the running requests preempted to free them
    (newest first, already taken out of `running` with their blocks freed).

    The blocks are None when `req` itself was the newest and had to go. A victim is never a
    request already scheduled this step: those sit before `req` in `running`, victims at the end.
    """
    preempted: list[Request] = []
    blocks = kv.allocate_slots(req, num_new)
    while blocks is None:
        victim = running[-1]
        preempt(kv, running, victim)
        preempted.append(victim)
        if victim is req:
            return None, preempted
        blocks = kv.allocate_slots(req, num_new)
    return blocks, preempted


def preempt(kv: KVCacheManager, running: list[Request], req: Request) -> None:
    """Take a running request off the worker: free its blocks and forget what was computed.

    Tokens it has in flight (sampled by a step not back yet) become stale: the worker forgets
    the copy that sampled them, so they are dropped on arrival and recomputed.
    """
    running.remove(req)
    kv.free(req)
    req.num_computed_tokens = 0
    req.num_draft_computed = 0
    if req.num_drafts_in_flight:  # its one step in flight returns an unknown number of rows
        req.drop_results_through = req.last_step_id
        req.num_drafts_in_flight = 0
    else:
        req.num_stale_tokens += req.num_output_placeholders
    req.num_output_placeholders = 0
    req.status = RequestStatus.PREEMPTED
    req.num_preemptions += 1
