"""Continuous batching: which tokens of which requests run in the next step.

Every step the scheduler fills a token budget (`max_num_batched_tokens`) with the running
requests first (a decode is one token, an unfinished prefill the rest of its prompt up to
the budget), then starts the parallel samples whose prompt is computed, then admits waiting
requests in arrival order while the budget, `max_num_seqs` and the free blocks allow. A
waiting request first takes the longest cached prefix of full blocks (prefix caching) and
computes only the rest. A long prompt is computed in chunks over several steps. When a
running request needs a block and none is free, the newest running request is preempted
(preemption.py): its blocks are freed and it is recomputed later from its tokens.

Async scheduling: the service may plan step n+1 before step n's result is back. A request
whose step in flight samples a token holds a placeholder for it; the worker knows that token,
so the next step can compute it. Results are applied in step order; tokens for requests that
finished, were aborted or were preempted meanwhile are dropped, so a stop found one step late
costs one wasted token that never reaches the tokenizer.

The plan sent to the worker carries only differences: requests new to the worker, the new
block ids of the others, block copies, and the ids of requests the worker may forget.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field

from protocol import CachedRequestData, DraftPlan, DraftRequest, NewRequestData, StepPlan, StepResult, TokenOutput
from protocol.config import SpeculativeConfig
from protocol.messages import Logprobs, PromptLogprobs
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.preemption import allocate_or_preempt, preempt
from scheduler_svc.request import Request, RequestStatus
from scheduler_svc.speculation import SpecCounters, can_speculate, may_draft_next, propose

logger = logging.getLogger("pagoda.scheduler")


@dataclass
class SchedulerConfig:
    num_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: list[int] = field(default_factory=list)
    enable_prefix_caching: bool = True
    model_name: str = ""  # a prefix-cache extra key: K/V of one model is no use to another
    speculative: SpeculativeConfig | None = None  # speculative decoding (speculation.py)


@dataclass
class StepUpdate:
    """What one step's result changed: new tokens per request, and who finished."""

    outputs: list[tuple[str, TokenOutput]]  # (reply_to, output)
    finished: list[Request]


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv = KVCacheManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching, (config.model_name, None)
        )
        self.block_pool = self.kv.pool
        self.requests: dict[str, Request] = {}  # live requests (parallel samples each) by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # n > 1: parent id -> its samples; leader (sample 0) id -> samples not started yet,
        # which fork from the leader once its prompt is computed.
        self.samples: dict[str, list[Request]] = {}
        self.pending_forks: dict[str, list[Request]] = {}
        # Requests the worker holds state for but must drop at the next step.
        self._finished_for_worker: list[str] = []
        self._step_id = 0
        self.num_preemptions = 0
        self.spec = SpecCounters()
        # Draft-model speculation: the context of the group's draft worker once it is ready
        # (0: none is; requests then run without drafts).
        self.draft_max_model_len = 0

    # ---- requests in and out -----------------------------------------------------------

    def add_request(
        self, request: Request, outputs_so_far: list[list[int]] | None = None, finished: dict[int, str] | None = None
    ) -> None:
        """Queue a request; one with `sampling.n` > 1 runs as n samples sharing its prompt.

        `outputs_so_far` (by sample index) and `finished` (index -> finish reason): a request
        re-submitted after a scheduler restart. Each sample continues from its outputs as if
        back from a preemption (prompt + outputs computed again; seeds, penalties, min_tokens
        and max_tokens count the outputs); samples run on their own, as their tokens differ.
        """
        samples = request.split_samples()
        for s in samples:
            if s.request_id in self.requests or s.parent_id in self.samples:
                raise ValueError(f"duplicate request id {request.request_id!r}")
        if outputs_so_far or finished:
            self._add_resumed(request.request_id, samples, outputs_so_far or [], finished or {})
            return
        for s in samples:
            self.requests[s.request_id] = s
        self.waiting.append(samples[0])
        if len(samples) > 1:
            self.samples[request.request_id] = samples
            self.pending_forks[samples[0].request_id] = samples[1:]

    def _add_resumed(
        self, parent_id: str, samples: list[Request], outputs: list[list[int]], finished: dict[int, str]
    ) -> None:
        reasons = {s.value: s for s in RequestStatus if s.finished}
        if any(r not in reasons for r in finished.values()):
            raise ValueError(f"finish reasons must be one of {sorted(reasons)}")
        longest = max((len(o) for i, o in enumerate(outputs) if i not in finished), default=0)
        if longest >= samples[0].max_tokens or samples[0].num_prompt_tokens + longest >= self.config.max_model_len:
            raise ValueError("a sample's outputs so far already reach max_tokens or the context")
        for s in samples:
            if s.index < len(outputs):
                s.output_token_ids = list(outputs[s.index])
            if s.index in finished:
                s.status = reasons[finished[s.index]]  # kept only to answer `adopt`
                continue
            self.requests[s.request_id] = s
            self.waiting.append(s)
        if len(samples) > 1 and not all(s.status.finished for s in samples):
            self.samples[parent_id] = samples

    def adopt(self, request_id: str, reply_to: str) -> list[Request]:
        """A live request's samples (those finished too, while others run), from now on
        answering to `reply_to`: its tokenizer died. Empty if the request is not live."""
        samples = self.samples.get(request_id) or [r for r in [self.requests.get(request_id)] if r is not None]
        for req in samples:
            req.reply_to = reply_to
        return samples

    def abort(self, request_ids: list[str], indices: list[int] | None = None) -> list[Request]:
        """Finish these requests now: every sample, or only sample `indices[k]` of `request_ids[k]`.

        Unknown or already finished ids are ignored.
        """
        aborted = []
        for k, rid in enumerate(request_ids):
            samples = self.samples.get(rid) or [r for r in [self.requests.get(rid)] if r is not None]
            for req in list(samples):
                if (indices is None or req.index == indices[k]) and not req.status.finished:
                    self._finish(req, RequestStatus.FINISHED_ABORTED)
                    aborted.append(req)
        return aborted

    def reset_worker(self) -> None:
        """The worker restarted and lost every request and all K/V: recompute from the tokens."""
        preempted = list(self.running)
        for req in preempted:
            preempt(self.kv, self.running, req)
        self._requeue(preempted)
        for req in self.requests.values():
            req.num_output_placeholders = 0
            req.num_stale_tokens = 0  # the steps that would have sampled them are lost
            req.num_drafts_in_flight = 0
        self._finished_for_worker = []
        self.kv.reset_prefix_cache()

    def reset_drafts(self) -> None:
        """The draft worker (re)started with an empty cache: it computes every request's tokens again."""
        for req in self.requests.values():
            req.num_draft_computed = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending_forks)

    @property
    def num_steps(self) -> int:
        return self._step_id

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(p) for p in self.pending_forks.values())

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Plan the next step, or None when there is nothing to run."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        drafts: dict[str, list[int]] = {}
        spec = self.config.speculative
        if spec is not None and len(self.running) > spec.disable_by_batch_size:
            spec = None  # a large batch: verifying drafts would cost more than it saves
        # Samples fork only from a prompt computed by an earlier step: the worker copies the
        # leader's partial block at the start of the step, before this step writes anything.
        forkable = [
            leader
            for lid in self.pending_forks
            if (leader := self.requests[lid]).status is RequestStatus.RUNNING
            and leader.num_computed_tokens >= leader.num_prompt_tokens
        ]

        # Running requests first, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = req.num_tokens + req.num_output_placeholders - req.num_computed_tokens
            if num_new <= 0 or req.num_drafts_in_flight or self._stops_by_length_in_flight(req):
                i += 1  # (drafts in flight: its next tokens are unknown until their result)
                continue
            num_new = min(num_new, budget)
            proposal = []
            if spec is not None and num_new == 1 and can_speculate(req) and spec.method == "draft_model":
                if self.draft_max_model_len and req.num_output_placeholders:
                    i += 1  # the draft model continues from its newest token: wait for it
                    continue
                if self.draft_max_model_len:
                    room = min(req.max_tokens - len(req.output_token_ids), self.config.max_model_len - req.num_tokens,
                               self.draft_max_model_len - req.num_tokens)
                    # Placeholders: the draft worker's tokens replace them before the plan goes out.
                    proposal = [-1] * max(0, min(spec.num_speculative_tokens, room - 1, budget - 1))
            elif spec is not None and num_new == 1 and can_speculate(req):
                if req.num_output_placeholders and may_draft_next(spec, req):
                    i += 1  # drafts follow its newest token: wait for it (no overlap of its steps)
                    continue
                if not req.num_output_placeholders:  # (else: no draft could follow it)
                    room = min(req.max_tokens - len(req.output_token_ids), self.config.max_model_len - req.num_tokens)
                    proposal = propose(spec, req, min(room - 1, budget - 1))
            blocks, preempted = allocate_or_preempt(self.kv, self.running, req, num_new + len(proposal))
            self._requeue(preempted)
            if blocks is None:
                break
            new_blocks[req.request_id] = blocks
            scheduled[req.request_id] = num_new + len(proposal)
            if proposal:
                drafts[req.request_id] = proposal
            self.kv.cache_full_blocks(req, req.num_computed_tokens + num_new)
            budget -= num_new + len(proposal)
            i += 1

        # Then parallel samples whose leader's prompt is computed: one token each.
        copies: list[tuple[int, int]] = []
        for leader in forkable:
            pending = self.pending_forks[leader.request_id]
            while (
                pending
                and leader.status is RequestStatus.RUNNING
                and budget > 0
                and len(self.running) < self.config.max_num_seqs
                and self.block_pool.num_free > 0
            ):
                sample = pending.pop(0)
                copy = self.kv.fork(leader, sample)
                if copy is not None:
                    copies.append(copy)
                self._start_running(sample)
                scheduled[sample.request_id] = 1
                budget -= 1
            if not pending:
                del self.pending_forks[leader.request_id]

        # Then admit waiting requests in arrival order (FCFS: stop at the first that does not fit).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits = self.kv.cached_prefix(req)
            num_new = min(req.num_tokens - len(hits) * self.config.block_size, budget)
            if self.kv.allocate_slots(req, num_new, hits) is None:
                break
            self.kv.record_lookup(req, len(hits) * self.config.block_size)
            self.waiting.popleft()
            self._start_running(req)
            scheduled[req.request_id] = num_new
            self.kv.cache_full_blocks(req, req.num_computed_tokens + num_new)
            budget -= num_new

        if not scheduled and not self._finished_for_worker:
            return None
        return self._make_plan(scheduled, new_blocks, copies, drafts)

    @staticmethod
    def needs_drafts(plan: StepPlan) -> bool:
        """Whether the plan holds draft placeholders (draft-model speculation) to fill first."""
        return any(d and d[0] < 0 for d in plan.spec_token_ids.values())

    def draft_plan(self, plan: StepPlan) -> DraftPlan:
        """What the draft worker needs for the plan's requests with drafts; call right after
        `schedule`."""
        asks = [(self.requests[rid], len(d)) for rid, d in plan.spec_token_ids.items()]
        return DraftPlan(plan.step_id, [
            DraftRequest(r.request_id, r.all_token_ids, r.num_draft_computed, list(r.block_ids), k) for r, k in asks
        ])

    def fill_drafts(self, plan: StepPlan, drafts: dict[str, list[int]]) -> None:
        """Put the draft worker's tokens in the plan's placeholders. A request given fewer
        (none: the draft worker died) runs fewer: its scheduled tokens and computed count shrink
        by the difference (its extra blocks stay, for its next tokens)."""
        for rid, placeholders in list(plan.spec_token_ids.items()):
            k = len(placeholders)
            got = [t for t in drafts.get(rid, [])[:k] if t >= 0]
            short = k - len(got)
            if got:
                plan.spec_token_ids[rid] = got
            else:
                del plan.spec_token_ids[rid]
            plan.num_scheduled_tokens[rid] -= short
            req = self.requests.get(rid)
            if req is None or req.last_step_id != plan.step_id or req.num_drafts_in_flight != k:
                continue  # aborted meanwhile: the worker computes it and drops it next step
            req.num_computed_tokens -= short
            req.num_drafts_in_flight = len(got)
            req.num_output_placeholders = 1 + len(got)
            if got:  # the draft computed every known token and its drafts but the last
                req.num_draft_computed = req.num_tokens + len(got) - 1

    def _stops_by_length_in_flight(self, req: Request) -> bool:
        """Whether the tokens in flight already take `req` to its length limit: no more steps."""
        pending = req.num_output_placeholders
        return pending > 0 and (
            len(req.output_token_ids) + pending >= req.max_tokens
            or req.num_tokens + pending >= self.config.max_model_len
        )

    def _start_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        req.is_new_to_worker = True
        self.running.append(req)

    def _make_plan(
        self,
        scheduled: dict[str, int],
        new_blocks: dict[str, list[int]],
        copies: list[tuple[int, int]],
        drafts: dict[str, list[int]],
    ) -> StepPlan:
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
                        num_output_tokens=len(req.output_token_ids),
                    )
                )
                req.is_new_to_worker = False
            else:
                cached_reqs.append(
                    CachedRequestData(req.request_id, new_blocks[req.request_id], req.num_computed_tokens)
                )
            req.num_computed_tokens += n
            req.last_step_id = self._step_id + 1
            if req.request_id in drafts:
                # Its kept drafts and one more token come back: up to 1 + k rows.
                req.num_drafts_in_flight = len(drafts[req.request_id])
                req.num_output_placeholders = 1 + req.num_drafts_in_flight
            elif req.num_computed_tokens == req.num_tokens + req.num_output_placeholders:
                req.num_output_placeholders += 1  # this step samples its next token
        self._step_id += 1
        plan = StepPlan(
            step_id=self._step_id,
            new_requests=new_reqs,
            cached_requests=cached_reqs,
            num_scheduled_tokens=scheduled,
            finished_request_ids=self._finished_for_worker,
            block_copies=copies,
            spec_token_ids=drafts,
        )
        self._finished_for_worker = []
        return plan

    def _requeue(self, preempted: list[Request]) -> None:
        """Preempted requests go back to the front of the queue; the worker forgets them."""
        for req in preempted:
            self.num_preemptions += 1
            self._finished_for_worker.append(req.request_id)
            self.waiting.appendleft(req)

    # ---- results -----------------------------------------------------------------------

    def update(self, result: StepResult) -> StepUpdate:
        """Append each sampled token, apply token-level stops, free what finished.

        Results must be applied in step order.
        """
        outputs: list[tuple[str, TokenOutput]] = []
        finished: list[Request] = []
        for rid, chunk in (result.prompt_logprobs or {}).items():
            req = self.requests.get(rid)
            if req is not None and not req.output_token_ids:  # else: sent already
                req.prompt_logprobs = _join_prompt_logprobs(req.prompt_logprobs, chunk)
        rows_of = Counter(result.request_ids)  # a request with drafts has one row per token
        for row, (rid, token) in enumerate(zip(result.request_ids, result.token_ids, strict=True)):
            req = self.requests.get(rid)
            if req is None:
                continue  # finished or aborted while the step ran
            if result.step_id <= req.drop_results_through:
                continue  # a step with drafts planned before a preemption: recomputed instead
            if req.num_stale_tokens > 0:
                req.num_stale_tokens -= 1  # sampled before a preemption: recomputed instead
                continue
            if req.num_drafts_in_flight:  # its first row: how many drafts were kept
                kept = rows_of[rid] - 1
                self.spec.record(req.num_drafts_in_flight, kept)
                # The draft's cache holds the kept drafts, not the rejected ones (draft model).
                req.num_draft_computed = min(req.num_draft_computed, req.num_tokens + kept)
                req.num_computed_tokens -= req.num_drafts_in_flight - kept  # rejected: computed again
                req.num_output_placeholders = rows_of[rid]
                req.num_drafts_in_flight = 0
            if req.status is not RequestStatus.RUNNING or req.num_output_placeholders <= 0:
                raise AssertionError(f"step {result.step_id} sampled a token {req} did not expect")
            req.num_output_placeholders -= 1
            req.output_token_ids.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                self._finish(req, status)
                finished.append(req)
            else:
                self.kv.cache_full_blocks(req, req.num_computed_tokens)  # it may fill a computed block
            reason = status.value if status is not None else None
            out = TokenOutput(req.parent_id, [token], reason, req.num_prompt_tokens, req.index)
            if req.sampling.logprobs is not None and result.logprobs is not None:
                out.logprobs = _row_logprobs(result, row, req.sampling.logprobs)
            if req.sampling.prompt_logprobs is not None and len(req.output_token_ids) == 1:
                out.prompt_logprobs = req.prompt_logprobs or PromptLogprobs(1, [], [], [], [])
                req.prompt_logprobs = None
            outputs.append((req.reply_to, out))
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
        else:  # a parallel sample that had not started
            leader_id = self.samples[req.parent_id][0].request_id
            self.pending_forks[leader_id].remove(req)
            if not self.pending_forks[leader_id]:
                del self.pending_forks[leader_id]
        self.kv.free(req)
        req.status = status
        del self.requests[req.request_id]
        # Samples still waiting for this leader start from the prompt on their own instead.
        orphans = self.pending_forks.pop(req.request_id, [])
        self.waiting.extendleft(reversed(orphans))
        if req.parent_id in self.samples and all(s.status.finished for s in self.samples[req.parent_id]):
            del self.samples[req.parent_id]


def _row_logprobs(result: StepResult, row: int, k: int) -> Logprobs:
    """Row `row`'s logprobs, cut to the request's own top-k (the step carries the largest k)."""
    assert result.logprobs is not None
    top_ids = result.top_logprob_ids[row][:k] if result.top_logprob_ids is not None else []
    top_lps = result.top_logprobs[row][:k] if result.top_logprobs is not None else []
    return Logprobs([result.logprobs[row]], [top_ids], [top_lps])


def _join_prompt_logprobs(joined: PromptLogprobs | None, chunk: PromptLogprobs) -> PromptLogprobs:
    """A request's prompt logprobs so far with a chunk's appended. A chunk computed again (after
    a preemption) adds only the entries beyond those joined; chunks come in prompt order."""
    if joined is None:
        joined = PromptLogprobs(1, [], [], [], [])
    skip = joined.first + len(joined.token_logprobs) - chunk.first
    if skip < 0:  # a gap: not expected (these requests take no prefix-cache hit)
        logger.warning("dropping prompt logprobs from token %d after %d", chunk.first, chunk.first + skip - 1)
        return joined
    joined.token_logprobs += chunk.token_logprobs[skip:]
    joined.token_ranks += chunk.token_ranks[skip:]
    joined.top_token_ids += chunk.top_token_ids[skip:]
    joined.top_logprobs += chunk.top_logprobs[skip:]
    return joined
