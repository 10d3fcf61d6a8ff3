"""The engine view (`/engine`): what the scheduler adds to its stats while a frontend watches.

Nothing here runs while nobody watches. A frontend with an `/engine/stream` client sends
`Watch(ttl_s)` through its tokenizers every second; the scheduler then records each planned
step's prefill and decode tokens and, with every stats message (at most every 0.2 s), builds an
`EngineView`: each worker group's state, ranks and KV blocks (downsampled to a grid), and the
steps since the previous view. The watch expires `ttl_s` after the last one came, so a watcher
that leaves, or a frontend or tokenizer that dies, needs no message to stop it.
"""

from __future__ import annotations

from collections import deque

from protocol import StepPlan
from protocol.messages import EngineView, GroupView, KVGrid
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.worker_group import WorkerGroup

MAX_CELLS = 2048  # KV grid cells over all groups: a pool larger than this is downsampled
MAX_WATCH_TTL_S = 10.0  # a Watch keeps the view on for at most this long
MAX_STEPS = 256  # steps kept between two views (the latest)


def kv_grid(pool: BlockPool, max_cells: int = MAX_CELLS) -> KVGrid:
    """The pool's blocks in at most `max_cells` cells of `blocks_per_cell` consecutive blocks each,
    counting per cell the blocks in use (held by a request) and the cached ones nobody holds
    (reusable by a prefix hit); the rest of a cell's blocks are free."""
    n = pool.num_blocks
    per = -(-n // max(1, max_cells))
    refs = pool.ref_counts
    used = []
    for lo in range(0, n, per):
        cell = refs[lo : lo + per]
        used.append(len(cell) - cell.count(0))
    cached = [0] * len(used)
    for block in pool.cached.values():  # every block with a hash, held or not
        if refs[block] == 0:
            cached[block // per] += 1
    return KVGrid(n, per, used, cached)


def step_split(scheduler: Scheduler, plan: StepPlan) -> tuple[int, int]:
    """(prefill, decode) tokens of a step just planned: a decode is one token of a request that
    computes one of its outputs (its position is past the prompt); everything else (prompt
    chunks, a preempted request's recomputation, a forked sample's last prompt token) is prefill."""
    prefill = decode = 0
    for rid, n in plan.num_scheduled_tokens.items():
        req = scheduler.requests.get(rid)
        # The plan has advanced num_computed_tokens: the step's last position is num_computed - 1.
        if n == 1 and req is not None and req.num_computed_tokens - 1 >= req.num_prompt_tokens:
            decode += 1
        else:
            prefill += n
    return prefill, decode


def group_state(group: WorkerGroup, served: bool) -> str:
    if group.serving:
        return "draining" if group.draining_since is not None else "serving"
    return "lost" if served else "starting"


class ViewRecorder:
    """The watch rule, the steps recorded while watched, and the views built from them."""

    def __init__(self, scheduler_id: str) -> None:
        self.scheduler_id = scheduler_id
        self.watched_until = 0.0  # time.monotonic() until which some frontend watches
        self.watching = False  # set by the service once per loop: the per-step check is a bool
        self.steps: deque[tuple[int, int]] = deque(maxlen=MAX_STEPS)
        self.num_views = 0
        self.served: set[int] = set()  # groups that served once: missing ranks then mean lost
        # Every worker's latest pid, and its restarts (a hello again with a new pid) by group:
        # counted at each hello, watched or not (a hello is rare), since this scheduler started.
        self.pids: dict[str, int] = {}
        self.restarts: dict[int, dict[str, int]] = {}

    def on_hello(self, group: int, member_id: str, pid: int) -> None:
        restarts = self.restarts.setdefault(group, {})
        restarts.setdefault(member_id, 0)
        if self.pids.get(member_id, pid) != pid:
            restarts[member_id] += 1
        self.pids[member_id] = pid

    def watch(self, ttl_s: float, now: float) -> None:
        self.watched_until = max(self.watched_until, now + min(max(ttl_s, 0.0), MAX_WATCH_TTL_S))
        self.watching = now < self.watched_until

    def tick(self, now: float) -> bool:
        """Whether someone watches now; forgets the steps recorded when the watch has expired."""
        watching = now < self.watched_until
        if self.watching and not watching:
            self.steps.clear()
        self.watching = watching
        return watching

    def record_step(self, scheduler: Scheduler, plan: StepPlan) -> None:
        if plan.num_scheduled_tokens:  # not a plan that only tells the worker what to forget
            self.steps.append(step_split(scheduler, plan))

    def build(self, groups: dict[int, WorkerGroup]) -> EngineView:
        """A view of every group now, with the steps since the previous view."""
        views = []
        cells = max(1, MAX_CELLS // max(1, len(groups)))
        for gid, group in sorted(groups.items()):
            if group.serving:
                self.served.add(gid)
            s = group.scheduler
            ranks = [group.workers[r] for r in sorted(group.workers)]
            views.append(
                GroupView(
                    group=gid,
                    state=group_state(group, gid in self.served),
                    size=group.size,
                    ranks=ranks,
                    pids=[self.pids.get(m, 0) for m in ranks],
                    restarts={m: c for m, c in self.restarts.get(gid, {}).items() if c},
                    running=s.num_running if s is not None else 0,
                    waiting=s.num_waiting if s is not None else 0,
                    kv=kv_grid(s.block_pool, cells) if s is not None else None,
                )
            )
        self.num_views += 1
        steps = list(self.steps)
        self.steps.clear()
        return EngineView(self.num_views, self.scheduler_id, views, steps)

