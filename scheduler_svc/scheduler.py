"""Continuous batching: which tokens of which requests run in the next step.

Every step the scheduler fills a token budget (`max_num_batched_tokens`) with the running
requests first (a decode is one token, an unfinished prefill the rest of its prompt up to
the budget), then admits waiting requests in arrival order while the budget, `max_num_seqs`
and the free blocks allow. A long prompt is computed in chunks over several steps. When a
running request needs a block and none is free, the newest running request is preempted:
its blocks are freed and it is recomputed later from its tokens (which the scheduler owns).

The plan sent to the worker carries only differences: requests new to the worker, the new
block ids of the others, and the ids of requests the worker may forget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protocol import CachedRequestData, NewRequestData, StepPlan, StepResult, TokenOutput
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    num_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class StepUpdate:
    """What one step's result changed: new tokens per request, and who finished."""

    outputs: list[tuple[str, TokenOutput]]  # (reply_to, output)
    finished: list[Request]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_pool = BlockPool(config.num_blocks)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests the worker holds state for but must drop at the next step.
        self._finished_for_worker: list[str] = []
        self._step_id = 0
        self.num_preemptions = 0

    # ---- requests in and out -----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_ids: list[str]) -> list[Request]:
        """Finish these requests now; unknown or already finished ids are ignored."""
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            aborted.append(req)
        return aborted

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_steps(self) -> int:
        return self._step_id

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Plan the next step, or None when there is nothing to run."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}

        # Running requests first, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:  # its sampled token has not come back yet
                i += 1
                continue
            blocks = self._blocks_for(req, num_new)
            while blocks is None:
                victim = self.running[-1]
                self._preempt(victim)
                scheduled.pop(victim.request_id, None)
                new_blocks.pop(victim.request_id, None)
                if victim is req:
                    break
                blocks = self._blocks_for(req, num_new)
            if blocks is None:
                break
            new_blocks[req.request_id] = blocks
            scheduled[req.request_id] = num_new
            budget -= num_new
            i += 1

        # Then admit waiting requests in arrival order (FCFS: stop at the first that does not fit).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            blocks = self._blocks_for(req, num_new)
            if blocks is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.is_new_to_worker = True
            self.running.append(req)
            new_blocks[req.request_id] = blocks
            scheduled[req.request_id] = num_new
            budget -= num_new

        if not scheduled and not self._finished_for_worker:
            return None
        return self._make_plan(scheduled, new_blocks)

    def _blocks_for(self, req: Request, num_new: int) -> list[int] | None:
        """Allocate the blocks `num_new` more tokens need, or None if too few are free."""
        need = cdiv(req.num_computed_tokens + num_new, self.config.block_size) - len(req.block_ids)
        if need > self.block_pool.num_free:
            return None
        blocks = self.block_pool.allocate(need) if need > 0 else []
        req.block_ids.extend(blocks)
        return blocks

    def _preempt(self, req: Request) -> None:
        """Free a running request's blocks and queue it to be recomputed from its tokens."""
        self.running.remove(req)
        self.block_pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._finished_for_worker.append(req.request_id)
        self.waiting.appendleft(req)

    def _make_plan(self, scheduled: dict[str, int], new_blocks: dict[str, list[int]]) -> StepPlan:
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        for req in self.running:
            n = scheduled.get(req.request_id)
            if n is None:
                continue
            if req.is_new_to_worker:
                new_reqs.append(
                    NewRequestData(
                        req.request_id,
                        req.all_token_ids,
                        req.sampling,
                        list(req.block_ids),
                        req.num_computed_tokens,
                    )
                )
                req.is_new_to_worker = False
            else:
                cached_reqs.append(
                    CachedRequestData(req.request_id, new_blocks[req.request_id], req.num_computed_tokens)
                )
            req.num_computed_tokens += n
        self._step_id += 1
        plan = StepPlan(
            step_id=self._step_id,
            new_requests=new_reqs,
            cached_requests=cached_reqs,
            num_scheduled_tokens=scheduled,
            finished_request_ids=self._finished_for_worker,
        )
        self._finished_for_worker = []
        return plan

    # ---- results -----------------------------------------------------------------------

    def update(self, result: StepResult) -> StepUpdate:
        """Append each sampled token, apply token-level stops, free what finished."""
        outputs: list[tuple[str, TokenOutput]] = []
        finished: list[Request] = []
        for rid, token in zip(result.request_ids, result.token_ids):
            req = self.requests.get(rid)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted or preempted while the step ran
            req.output_token_ids.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                self._finish(req, status)
                finished.append(req)
            reason = status.value if status is not None else None
            outputs.append((req.reply_to, TokenOutput(rid, [token], reason, req.num_prompt_tokens)))
        return StepUpdate(outputs, finished)

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling
        num_out = len(req.output_token_ids)
        if num_out >= sp.min_tokens:
            if not sp.ignore_eos and token in self.config.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in sp.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if num_out >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._finished_for_worker.append(req.request_id)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_pool.free(req.block_ids)
        req.block_ids = []
        req.status = status
        del self.requests[req.request_id]
