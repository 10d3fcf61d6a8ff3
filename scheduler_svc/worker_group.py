"""One worker group as the scheduler sees it: the ranks serving one model replica, its own
`Scheduler` (KV pool, prefix cache, queues) and the steps it has in flight.

With `--data-parallel-size N` (or worker services in compose) several groups join the one
scheduler process; each request is placed on one group (`place`), and a group that is lost
hands its requests to the others.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec

from protocol import Hello, SchedulerStats, StepPlan
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler


class WorkerGroup:
    def __init__(self, group_id: int, size: int) -> None:
        self.group_id = group_id
        self.size = size  # its tensor-parallel ranks
        self.workers: dict[int, str] = {}  # rank -> member id, of the ranks that said hello
        self.heard: dict[str, float] = {}  # member id -> when its heartbeat thread last beat
        self.rank0_hello: Hello | None = None  # rank 0 speaks for the group
        # None until the group is first whole, and again once its requests went to another
        # group after it was lost (it then starts afresh when it is whole again).
        self.scheduler: Scheduler | None = None
        # Step ids sent to the ranks whose results have not come back, oldest first, and the
        # step-log line of each, written once its result (and the worker's timing) is in.
        self.steps_in_flight: deque[int] = deque()
        self.step_log_lines: dict[int, dict[str, Any]] = {}
        self.progress_at = 0.0  # when a result last came, or steps went out with none in flight
        self.had_work = False
        # When a rank said it drains (SIGTERM on its own): no new request, then Shutdown.
        self.draining_since: float | None = None
        # Draft-model speculation: the group's draft worker (its member id), when it last beat,
        # its cache once set up (blocks, context; 0: not ready), and the plan waiting for its
        # drafts (no later plan is made meanwhile: plans reach the ranks in order) since when.
        self.draft: str | None = None
        self.draft_heard = 0.0
        self.draft_num_blocks = 0
        self.draft_max_model_len = 0
        self.awaiting_drafts: StepPlan | None = None
        self.drafts_asked_at = 0.0

    @property
    def name(self) -> str:
        return f"group {self.group_id}"

    @property
    def whole(self) -> bool:
        """Every rank has said hello: plans may go out (to all of them, or to none)."""
        return len(self.workers) == self.size and self.rank0_hello is not None

    @property
    def serving(self) -> bool:
        return self.whole and self.scheduler is not None

    @property
    def load(self) -> int:
        s = self.scheduler
        return 0 if s is None else s.num_running + s.num_waiting

    @property
    def drained(self) -> bool:
        return not self.steps_in_flight and (self.scheduler is None or not self.scheduler.has_work)

    def clear_members(self) -> None:
        self.draining_since = None
        self.workers.clear()
        self.heard.clear()
        self.rank0_hello = None
        self.steps_in_flight.clear()
        self.step_log_lines.clear()
        self.awaiting_drafts = None  # its step was never sent: the requests start over anyway

    def silent(self, now: float, after_s: float) -> list[str]:
        return [m for m, heard in self.heard.items() if now - heard > after_s]

    def cached_tokens(self, req: Request) -> int:
        """How many of `req`'s prompt tokens this group's prefix cache holds (no side effect)."""
        if self.scheduler is None:
            return 0
        return len(self.scheduler.kv.cached_prefix(req)) * self.scheduler.kv.block_size


# A group may hold this many requests more than the least loaded one (or twice as many) and
# still get a request for its prefix-cache hit; past that, the least loaded gets it. Without a
# bound, requests sharing a system prompt would all pile onto the group that cached it first.
BALANCE_SLACK = 4


def place(groups: list[WorkerGroup], req: Request) -> WorkerGroup:
    """The group for a new request (`groups` not empty): of those not overloaded against the
    least loaded, the longest prefix-cache hit, then the least load, then the lowest id."""
    least = min(g.load for g in groups)
    fair = [g for g in groups if g.load <= least + max(BALANCE_SLACK, least)]
    return max(fair, key=lambda g: (g.cached_tokens(req), -g.load, -g.group_id))


def take_live(scheduler: Scheduler) -> list[tuple[Request, list[list[int]], dict[int, str]]]:
    """Every live request of `scheduler`, as `Scheduler.add_request` takes a re-submitted one: a
    fresh request, each sample's outputs so far and the finished samples' reasons. For a group
    that was lost: another group recomputes them from their tokens, as after a preemption."""
    by_parent: dict[str, list[Request]] = {}
    for req in scheduler.requests.values():
        if not req.status.finished:
            by_parent.setdefault(req.parent_id, [])
    live = []
    for parent_id in by_parent:
        samples = scheduler.samples.get(parent_id) or [scheduler.requests[parent_id]]
        first = min(samples, key=lambda s: s.index)
        # Sample 0 has the request's parameters (seed + 0) with n = 1; the request had n samples.
        sampling = msgspec.structs.replace(first.sampling, n=len(samples))
        fresh = Request(parent_id, first.prompt_token_ids, sampling, first.reply_to, first.max_tokens,
                        first.arrival_time)
        outputs = [list(s.output_token_ids) for s in sorted(samples, key=lambda s: s.index)]
        finished = {s.index: s.status.value for s in samples if s.status.finished}
        live.append((fresh, outputs, finished))
    return live


def summed_stats(schedulers: list[Scheduler], worker_busy_s: float, worker_idle_s: float) -> SchedulerStats:
    """The figures summed over the worker groups' schedulers (KV usage over all their blocks)."""
    if not schedulers:
        return SchedulerStats()
    blocks = sum(s.config.num_blocks for s in schedulers)
    return SchedulerStats(
        num_running=sum(s.num_running for s in schedulers),
        num_waiting=sum(s.num_waiting for s in schedulers),
        kv_cache_usage=sum(s.block_pool.usage * s.config.num_blocks for s in schedulers) / blocks,
        prefix_cache_queries=sum(s.kv.num_queries for s in schedulers),
        prefix_cache_hits=sum(s.kv.num_hits for s in schedulers),
        num_preemptions=sum(s.num_preemptions for s in schedulers),
        num_steps=sum(s.num_steps for s in schedulers),
        worker_busy_s=worker_busy_s,
        worker_idle_s=worker_idle_s,
        num_held=sum(len(s.requests) + len(s.samples) + len(s.pending_forks) for s in schedulers),
        spec_num_drafts=sum(s.spec.num_drafts for s in schedulers),
        spec_num_draft_tokens=sum(s.spec.num_draft_tokens for s in schedulers),
        spec_num_accepted_tokens=sum(s.spec.num_accepted_tokens for s in schedulers),
        spec_num_accepted_tokens_per_pos=_sum_lists([s.spec.accepted_per_pos for s in schedulers]),
    )


def _sum_lists(lists: list[list[int]]) -> list[int]:
    out = [0] * max((len(x) for x in lists), default=0)
    for x in lists:
        for i, v in enumerate(x):
            out[i] += v
    return out
