"""The scheduler process: one loop over a ROUTER socket that tokenizers and workers connect to.

receive -> schedule -> send `StepPlan` to every worker rank -> receive rank 0's `StepResult`
-> update -> send each tokenizer one `TokenBatch` for the step. With async scheduling (the
default) up to two steps are in flight: step n+1 is planned and sent as soon as step n is
out, so the worker finds its next plan waiting when it finishes a step.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import defaultdict
from typing import Any

import msgspec
import zmq

from protocol import (
    Abort,
    Decoder,
    DraftResult,
    DraftSetup,
    EngineConfig,
    EngineReady,
    EngineRequest,
    ErrorReply,
    Heartbeat,
    Hello,
    SchedulerStats,
    Shutdown,
    StepPlan,
    StepResult,
    TokenBatch,
    TokenOutput,
    Watch,
    bind_router,
    encode,
)
from protocol.messages import SchedulerInbound, draft_worker_id, worker_id
from scheduler_svc.admission import unrunnable
from scheduler_svc.engine_view import ViewRecorder
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerConfig
from scheduler_svc.worker_group import WorkerGroup, place, summed_stats, take_live

logger = logging.getLogger("pagoda.scheduler")

# A worker whose heartbeats stop for this many intervals is dead (they beat from a thread, so
# a long step does not silence them).
WORKER_SILENT_HEARTBEATS = 5


class SchedulerService:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.ctx = zmq.Context()
        self.sock = bind_router(self.ctx, config.scheduler_addr, config)
        self.from_members = Decoder(SchedulerInbound)  # tokenizers and workers, on the one ROUTER
        # Tells tokenizers that reconnect whether this is a new scheduler, which holds none of their requests.
        self.scheduler_id = uuid.uuid4().hex
        # The worker groups (model replicas) by group id, each with its own Scheduler.
        self.groups: dict[int, WorkerGroup] = {}
        self.engine_ready: EngineReady | None = None
        self.vocab_size = 0  # from a worker's hello: token ids outside it are refused
        self.worker_ids: set[str] = set()  # every worker that ever said hello
        self.tokenizers: dict[str, float] = {}  # member id -> last heard
        self.max_steps_in_flight = 2 if config.async_scheduling else 1
        # The workers' time, from each result; a wait only counts as idle if the group had
        # work when the previous step came back (not while the server had nothing to do).
        self.worker_busy_s = 0.0
        self.worker_idle_s = 0.0
        self.step_log = open(config.step_log, "a", buffering=1) if config.step_log else None  # noqa: SIM115
        self._last_stats = 0.0
        self._sent_stats: SchedulerStats | None = None
        self._sent_stats_at = 0.0
        # The engine view (/engine): built into the stats only while a frontend watches (`Watch`).
        self.view = ViewRecorder(self.scheduler_id)

    # ---- sending -----------------------------------------------------------------------

    def _send(self, member_id: str, msg: msgspec.Struct) -> bool:
        try:
            self.sock.send_multipart([member_id.encode(), encode(msg)])
            return True
        except zmq.ZMQError as e:  # ROUTER_MANDATORY: the member is gone
            # At shutdown the workers may have stopped first (the same signal reached them);
            # a member already known to be gone is not worth a line per step.
            known = member_id in self.tokenizers or any(member_id in g.workers.values() for g in self.groups.values())
            log = logger.warning if known and not isinstance(msg, Shutdown) else logger.debug
            log("cannot reach %s: %s", member_id, e)
            return False

    # ---- receiving ---------------------------------------------------------------------

    def _handle(self, sender: str, msg: object) -> None:
        if isinstance(msg, Hello):
            self._on_hello(sender, msg)
        elif isinstance(msg, Heartbeat):
            if msg.member_id in self.tokenizers:
                self.tokenizers[msg.member_id] = time.monotonic()
            elif msg.member_id in self.worker_ids and sender == f"{msg.member_id}.hb":
                self._on_worker_heartbeat(msg.member_id, msg.draining)
            elif sender == f"{msg.member_id}.hb" and (group := self._draft_group(msg.member_id)) is not None:
                group.draft_heard = time.monotonic()
        elif isinstance(msg, EngineRequest):
            self._on_request(sender, msg)
        elif isinstance(msg, Abort):
            if msg.indices is not None and len(msg.indices) != len(msg.request_ids):
                logger.warning("dropping an abort of %d ids with %d indices", len(msg.request_ids), len(msg.indices))
            else:
                for s in self._schedulers():  # a request lives in one group; others ignore its id
                    s.abort(msg.request_ids, msg.indices)
        elif isinstance(msg, StepResult):
            self._on_result(sender, msg)
        elif isinstance(msg, DraftResult):
            self._on_drafts(sender, msg)
        elif isinstance(msg, Watch):
            self.view.watch(msg.ttl_s, time.monotonic())

    def _schedulers(self) -> list[Scheduler]:
        return [g.scheduler for g in self.groups.values() if g.scheduler is not None]

    def _draft_group(self, member: str) -> WorkerGroup | None:
        return next((g for g in self.groups.values() if g.draft == member), None)

    def _group_of(self, member: str) -> WorkerGroup | None:
        return next((g for g in self.groups.values() if member in g.heard), None)

    def _on_worker_heartbeat(self, member: str, draining: bool) -> None:
        if (group := self._group_of(member)) is not None:
            group.heard[member] = time.monotonic()
            if draining and group.draining_since is None:
                group.draining_since = time.monotonic()
                running = group.scheduler.num_running if group.scheduler is not None else 0
                logger.info("worker %s drains (%s got SIGTERM): no new request; %d running end first",
                            group.name, member, running)
        else:
            # A member of a lost group that woke up (a restarted one says hello before it
            # beats): it must exit, so that it is restarted and rejoins with a hello.
            logger.warning("%s beats after its group was lost: telling it to stop", member)
            self._send(member, Shutdown("worker group lost: restart and say hello"))

    def _on_hello(self, sender: str, msg: Hello) -> None:
        if msg.role == "tokenizer":
            self.tokenizers[sender] = time.monotonic()
            logger.info("tokenizer %s (pid %d) joined", sender, msg.pid)
            if self.engine_ready is not None:
                self._send(sender, self.engine_ready)
            return
        if msg.role == "draft":
            self._on_draft_hello(sender, msg)
            return
        if msg.role != "worker":
            logger.warning("hello from unknown role %r dropped", msg.role)
            return
        if sender != worker_id(msg.group, msg.rank) or msg.rank >= self.config.tensor_parallel_size or min(
            msg.group, msg.rank, msg.num_blocks - 1, msg.max_model_len - 1, msg.vocab_size
        ) < 0:
            # A worker's identity is its group's and rank's and it has a KV pool: any other
            # hello would hand the step loop (and requests) to a peer that never runs a step.
            logger.warning("dropping a worker hello from %r: group %d, rank %d, %d KV blocks, max_model_len %d",
                           sender, msg.group, msg.rank, msg.num_blocks, msg.max_model_len)
            return
        group = self.groups.setdefault(msg.group, WorkerGroup(msg.group, self.config.tensor_parallel_size))
        if group.size > 1 and group.workers.get(msg.rank) == sender:
            # A rank said hello again: it was restarted, and its peers, which shared a process
            # group with its predecessor, cannot go on: the whole group starts over.
            self._lose_group(group, f"{sender} restarted", gone=[sender])
        group.workers[msg.rank] = sender
        group.heard[sender] = time.monotonic()
        self.worker_ids.add(sender)
        self.view.on_hello(msg.group, sender, msg.pid)
        logger.info(
            "worker %s (rank %d, pid %d) joined: %d KV blocks of %d tokens, max_model_len %d",
            sender, msg.rank, msg.pid, msg.num_blocks, self.config.block_size, msg.max_model_len,
        )
        if msg.rank == 0:
            group.rank0_hello = msg
        if not group.whole:
            return  # a plan goes to every rank of the group, or to none
        # The group is whole: rank 0 speaks for it (every rank holds the same KV pool size).
        msg = group.rank0_hello
        assert msg is not None
        self.vocab_size = msg.vocab_size
        max_model_len = msg.max_model_len
        if msg.num_blocks * self.config.block_size < max_model_len:
            max_model_len = msg.num_blocks * self.config.block_size
            logger.warning("the KV pool holds only %d tokens: max_model_len lowered to that", max_model_len)
        if group.scheduler is not None:
            # A restarted worker lost every request's KV; the scheduler still has the tokens.
            if group.scheduler.num_running:
                logger.info("%d running requests start over from their tokens", group.scheduler.num_running)
            group.scheduler.reset_worker()
            group.steps_in_flight.clear()
            group.step_log_lines.clear()
            group.awaiting_drafts = None
        else:
            group.scheduler = Scheduler(
                SchedulerConfig(
                    num_blocks=msg.num_blocks,
                    block_size=self.config.block_size,
                    max_model_len=max_model_len,
                    max_num_seqs=self.config.max_num_seqs,
                    # A worker that does not say (an older one) runs the configured or CPU budget.
                    max_num_batched_tokens=msg.max_num_batched_tokens or self.config.token_budget(on_gpu=False),
                    eos_token_ids=msg.eos_token_ids,
                    enable_prefix_caching=self.config.enable_prefix_caching,
                    model_name=self.config.model_name,
                    speculative=self.config.speculative,
                )
            )
        if len(self.groups) > 1:
            logger.info("worker %s serves (%d of %d groups)", group.name,
                        sum(g.serving for g in self.groups.values()), len(self.groups))
        self.view.served.add(group.group_id)
        self._announce()
        self._setup_draft(group)

    # ---- draft-model workers (speculative decoding) -------------------------------------------

    def _on_draft_hello(self, sender: str, msg: Hello) -> None:
        """A draft worker's first hello (no cache yet) is answered with the group's KV pool,
        once the group serves; its second (cache allocated) makes it the group's drafter."""
        spec = self.config.speculative
        if spec is None or spec.method != "draft_model" or sender != draft_worker_id(msg.group) or msg.group < 0:
            logger.warning("dropping a draft worker hello from %r (group %d): this server takes no draft model",
                           sender, msg.group)
            self._send(sender, Shutdown("no draft model is configured"))
            return
        group = self.groups.setdefault(msg.group, WorkerGroup(msg.group, self.config.tensor_parallel_size))
        if group.draft is not None and (msg.num_blocks == 0 or group.draft_num_blocks):
            self._draft_lost(group, f"{sender} said hello again (restarted)")
        group.draft, group.draft_heard = sender, time.monotonic()
        if msg.num_blocks == 0:
            logger.info("draft worker %s (pid %d) joined", sender, msg.pid)
            self._setup_draft(group)
            return
        s = group.scheduler
        if s is None or msg.num_blocks != s.config.num_blocks or msg.vocab_size != self.vocab_size:
            why = (f"its cache of {msg.num_blocks} blocks and vocabulary of {msg.vocab_size} do not match the "
                   f"group's ({s.config.num_blocks if s else 0} blocks, vocabulary {self.vocab_size})")
            logger.warning("draft worker %s: %s; telling it to restart", sender, why)
            self._send(sender, Shutdown(why))
            group.draft = None
            return
        group.draft_num_blocks, group.draft_max_model_len = msg.num_blocks, msg.max_model_len
        s.draft_max_model_len = msg.max_model_len
        s.reset_drafts()
        logger.info("draft worker %s (pid %d) ready: drafts for %s (context %d)", sender, msg.pid, group.name,
                    msg.max_model_len)

    def _setup_draft(self, group: WorkerGroup) -> None:
        """Tell the group's draft worker the KV pool to mirror, once the group serves. A group
        that starts a fresh pool (after it was lost) makes its ready draft worker start over."""
        s = group.scheduler
        if group.draft is None or s is None or not group.serving:
            return
        if group.draft_num_blocks:
            if group.draft_num_blocks == s.config.num_blocks:
                s.draft_max_model_len = group.draft_max_model_len
                s.reset_drafts()
            else:
                self._send(group.draft, Shutdown("the worker group's KV pool changed"))
                self._draft_lost(group, "the worker group's KV pool changed")
            return
        self._send(group.draft, DraftSetup(s.config.num_blocks, s.config.max_model_len, self.vocab_size))

    def _on_drafts(self, sender: str, msg: DraftResult) -> None:
        group = self._draft_group(sender)
        plan = group.awaiting_drafts if group is not None else None
        if group is None or group.scheduler is None or plan is None or plan.step_id != msg.step_id:
            logger.warning("dropping drafts for step %d from %s: no plan waits for them", msg.step_id, sender)
            return
        group.awaiting_drafts = None
        group.scheduler.fill_drafts(plan, msg.drafts)
        self._send_plan(group, plan)

    def _draft_lost(self, group: WorkerGroup, reason: str) -> None:
        """The group decodes without drafts until a draft worker is ready again; a plan that
        waited for drafts goes out without them."""
        logger.warning("draft worker %s lost (%s): decoding goes on without drafts", group.draft, reason)
        group.draft = None
        group.draft_num_blocks = group.draft_max_model_len = 0
        if group.scheduler is not None:
            group.scheduler.draft_max_model_len = 0
        plan, group.awaiting_drafts = group.awaiting_drafts, None
        if plan is not None and group.scheduler is not None:
            group.scheduler.fill_drafts(plan, {})
            self._send_plan(group, plan)

    def _announce(self) -> None:
        """Tell the tokenizers what the engine can serve now: the smallest context of the groups
        serving (every group serves the same model; a smaller KV pool may cap it), or, with
        none serving, that requests wait."""
        serving = [g for g in self.groups.values() if g.serving]
        if not serving:
            if self.engine_ready is not None:
                self.engine_ready = msgspec.structs.replace(self.engine_ready, serving=False)
        else:
            configs = [g.scheduler.config for g in serving if g.scheduler is not None]  # (serving: all)
            self.engine_ready = EngineReady(
                max_model_len=min(c.max_model_len for c in configs),
                num_blocks=sum(c.num_blocks for c in configs),
                block_size=self.config.block_size,
                eos_token_ids=configs[0].eos_token_ids,
                scheduler_id=self.scheduler_id,
            )
        if self.engine_ready is not None:
            for tok in self.tokenizers:
                self._send(tok, self.engine_ready)

    def _on_request(self, sender: str, msg: EngineRequest) -> None:
        if msg.scheduler_id and msg.scheduler_id != self.scheduler_id:
            # Queued for this scheduler's dead predecessor; its tokenizer re-submits it once this one is ready.
            logger.info("dropping %s, sent to a previous scheduler", msg.request_id)
            return
        schedulers = self._schedulers()
        if not schedulers:
            self._send(sender, ErrorReply(msg.request_id, 503, "The engine is not ready yet.", "service_unavailable"))
            return
        if msg.resume and (live := next((x for s in schedulers if (x := s.adopt(msg.request_id, msg.reply_to))), [])):
            # Its tokenizer died: the new one rebuilds the text from every output token so far.
            catch_up = [
                TokenOutput(
                    r.parent_id, list(r.output_token_ids), r.status.value if r.status.finished else None,
                    r.num_prompt_tokens, r.index,
                )
                for r in live
                if r.output_token_ids or r.status.finished
            ]
            logger.info("%s now answers for %s (%d samples)", msg.reply_to, msg.request_id, len(live))
            if catch_up:
                self._send(msg.reply_to, TokenBatch(catch_up))
            return
        config = min((s.config for s in schedulers), key=lambda c: c.max_model_len)
        if (error := unrunnable(msg, config, self.vocab_size)) is not None:
            # Its tokenizer checks all this; a request that was not checked must neither crash
            # the worker (ids outside the embedding, positions past the context) nor stall the queue.
            logger.warning("refusing request %r: %s", msg.request_id, error)
            self._send(sender, ErrorReply(msg.request_id, 400, error, param="prompt"))
            return
        max_tokens = msg.sampling.max_tokens
        if max_tokens is None:
            max_tokens = config.max_model_len - len(msg.prompt_token_ids)
        req = Request(msg.request_id, msg.prompt_token_ids, msg.sampling, msg.reply_to, max_tokens, msg.arrival_time)
        if any(msg.request_id in s.requests or msg.request_id in s.samples for s in schedulers):
            self._send(sender, ErrorReply(msg.request_id, 400, f"duplicate request id {msg.request_id!r}",
                                          param="request_id"))
            return
        try:
            # Outputs so far: re-submitted by its tokenizer after this scheduler's predecessor died.
            self._add(req, msg.output_token_ids, msg.finished_samples)
        except ValueError as e:
            self._send(sender, ErrorReply(msg.request_id, 400, str(e), param="request_id"))

    def _add(self, req: Request, outputs: list[list[int]], finished: dict[int, str]) -> None:
        """Queue a request on a serving group (the best placed), or, with none serving, on a
        group waiting for its workers."""
        serving = [g for g in self.groups.values() if g.serving]
        staying = [g for g in serving if g.draining_since is None]
        waiting = [g for g in self.groups.values() if g.scheduler is not None]
        group = place(staying or serving or waiting, req)
        assert group.scheduler is not None
        group.scheduler.add_request(req, outputs, finished)

    def _on_result(self, sender: str, result: StepResult) -> None:
        group = self._group_of(sender)
        # A restarted scheduler gets the results its predecessor's worker still had queued: none is in flight.
        if (group is None or group.scheduler is None or group.workers.get(0) != sender
                or not group.steps_in_flight or result.step_id != group.steps_in_flight[0]):
            logger.warning("dropping the result of step %d, which is not in flight", result.step_id)
            return
        group.steps_in_flight.popleft()
        group.progress_at = time.monotonic()
        self.worker_busy_s += result.execute_s
        if group.had_work:
            self.worker_idle_s += result.idle_s
        update = group.scheduler.update(result)
        group.had_work = group.scheduler.has_work
        self._write_step_log(group, result)
        batches: dict[str, list[TokenOutput]] = defaultdict(list)
        for reply_to, out in update.outputs:
            batches[reply_to].append(out)
        for reply_to, outs in batches.items():
            # A tokenizer that died loses these; its requests go on, and the frontend hands
            # them to another tokenizer, to which `_on_request` sends every token so far.
            if not self._send(reply_to, TokenBatch(outs)) and self.tokenizers.pop(reply_to, None) is not None:
                logger.warning("tokenizer %s is gone; its requests keep running for its successor", reply_to)

    # ---- the loop ----------------------------------------------------------------------

    def _maybe_schedule(self) -> None:
        """Send each serving group plans until `max_steps_in_flight` are out or it has nothing to
        run. A plan with draft placeholders goes to the group's draft worker first, and to the
        ranks once its drafts are back (`_on_drafts`)."""
        for group in list(self.groups.values()):
            while (group.serving and group.awaiting_drafts is None
                   and len(group.steps_in_flight) < self.max_steps_in_flight):
                assert group.scheduler is not None
                plan = group.scheduler.schedule()
                if plan is None:
                    break
                if group.scheduler.needs_drafts(plan):
                    assert group.draft is not None
                    if self._send(group.draft, group.scheduler.draft_plan(plan)):
                        group.awaiting_drafts, group.drafts_asked_at = plan, time.monotonic()
                        break
                    group.awaiting_drafts = plan
                    self._draft_lost(group, "cannot be reached")  # sends the plan without drafts
                    continue
                if not self._send_plan(group, plan):
                    break

    def _send_plan(self, group: WorkerGroup, plan: StepPlan) -> bool:
        """The plan to every rank of the group; False if one cannot be reached (the group is lost)."""
        assert group.scheduler is not None
        unreachable = [m for _, m in sorted(group.workers.items()) if not self._send(m, plan)]
        if unreachable:
            self._lose_group(group, f"{', '.join(unreachable)} cannot be reached", gone=unreachable)
            return False
        if self.step_log is not None:
            group.step_log_lines[plan.step_id] = self._plan_log_line(group, plan)
        if self.view.watching:
            self.view.record_step(group.scheduler, plan)
        if not group.steps_in_flight:
            group.progress_at = time.monotonic()  # the step timeout counts from here
        group.steps_in_flight.append(plan.step_id)
        return True

    def _check_workers(self) -> None:
        """Declare a worker group lost when a member is silent or its steps never come back."""
        now = time.monotonic()
        silent_after = WORKER_SILENT_HEARTBEATS * self.config.heartbeat_interval_s
        for group in list(self.groups.values()):
            if group.draft is not None and now - group.draft_heard > silent_after:
                self._draft_lost(group, f"silent for over {silent_after:g} s")
            elif group.awaiting_drafts is not None and now - group.drafts_asked_at > self.config.step_timeout_s:
                self._send(group.draft or "", Shutdown("no drafts within --step-timeout-s"))
                self._draft_lost(group, f"no drafts for over {self.config.step_timeout_s:g} s (--step-timeout-s)")
            if not group.workers:
                continue
            if silent := group.silent(now, silent_after):
                self._lose_group(group, f"{', '.join(silent)} silent for over {silent_after:g} s", gone=silent)
            elif group.draining_since is not None and group.drained:
                self._lose_group(group, "drained")  # its ranks are told to stop
            elif group.draining_since is not None and now - group.draining_since > self.config.shutdown_timeout:
                self._lose_group(group, f"still draining after {self.config.shutdown_timeout:g} s (--shutdown-timeout)")
            elif group.steps_in_flight and now - group.progress_at > self.config.step_timeout_s:
                self._lose_group(group, f"no step result for over {self.config.step_timeout_s:g} s (--step-timeout-s)")

    def _lose_group(self, group: WorkerGroup, reason: str, gone: list[str] | None = None) -> None:
        """A worker group died or hangs. Its requests go to the other groups serving, which
        recompute them from their tokens; with none, they wait for a worker of this one to say
        hello again (tokenizers hear that nothing runs meanwhile).

        `gone`: members taken for dead, not told to stop: their identity may already be a
        restarted member's, whose hello is on its way.
        """
        running = group.scheduler.num_running if group.scheduler is not None else 0
        others = [g for g in self.groups.values() if g.serving and g is not group]
        where = f"{len(others)} other group(s) take them" if others else "they wait for a worker to say hello"
        log = logger.info if reason == "drained" else logger.warning
        log("lost the worker %s (%s): %d running requests; %s", "group" if len(self.groups) == 1 else group.name,
            reason, running, where)
        # The others exit (a hung one when it wakes up) and are restarted, to rejoin with a hello.
        for member in group.workers.values():
            if member not in (gone or []):
                self._send(member, Shutdown(f"worker group lost: {reason}"))
        group.clear_members()
        if group.scheduler is not None:
            group.scheduler.reset_worker()
            if others:
                for req, outputs, finished in take_live(group.scheduler):
                    place(others, req).scheduler.add_request(req, outputs, finished)  # type: ignore[union-attr]
                group.scheduler = None  # a fresh KV pool and queues when it is whole again
        self._announce()

    def _plan_log_line(self, group: WorkerGroup, plan: StepPlan) -> dict[str, Any]:
        s = group.scheduler
        assert s is not None
        return {
            "step": plan.step_id,
            "group": group.group_id,
            "time": time.time(),
            "requests": plan.num_scheduled_tokens,
            "new": [r.request_id for r in plan.new_requests],
            # Tokens of each new request found in the prefix cache (not computed this step).
            "cached": {r.request_id: s.requests[r.request_id].num_cached_tokens for r in plan.new_requests},
            "block_copies": len(plan.block_copies),
            "running": s.num_running,
            "waiting": s.num_waiting,
            "free_blocks": s.block_pool.num_free,
            "num_preemptions": s.num_preemptions,
            "spec_tokens": {rid: len(d) for rid, d in plan.spec_token_ids.items()},
            "prefix_cache_queries": s.kv.num_queries,
            "prefix_cache_hits": s.kv.num_hits,
            "in_flight": len(group.steps_in_flight),  # steps the worker had yet to finish
        }

    def _write_step_log(self, group: WorkerGroup, result: StepResult) -> None:
        """One JSON line per step, written when its result is back: the plan and the worker's timing."""
        line = group.step_log_lines.pop(result.step_id, None)
        if self.step_log is None or line is None:
            return
        line["worker_idle_s"] = round(result.idle_s, 6)
        line["worker_execute_s"] = round(result.execute_s, 6)
        self.step_log.write(json.dumps(line) + "\n")

    def stats(self) -> SchedulerStats:
        stats = summed_stats(self._schedulers(), self.worker_busy_s, self.worker_idle_s)
        stats.num_engine_views = self.view.num_views
        return stats

    def _send_stats(self) -> None:
        """Tell every tokenizer the figures when they changed, at most every 0.2 s."""
        now = time.monotonic()
        if now - self._sent_stats_at < 0.2:
            return
        stats = self.stats()
        if self.view.watching:  # a frontend shows /engine: a fresh view each time
            stats.engine_view = self.view.build(self.groups)
            stats.num_engine_views = self.view.num_views
        if stats == self._sent_stats:
            return
        for tok in self.tokenizers:
            self._send(tok, stats)
        self._sent_stats, self._sent_stats_at = stats, now

    def _log_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < 10.0 or not any(s.has_work for s in self._schedulers()):
            return
        self._last_stats = now
        stats = self.stats()
        logger.info(
            "running %d, waiting %d, KV usage %.1f%%, preemptions %d",
            stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage, stats.num_preemptions,
        )

    def run(self) -> None:
        logger.info("scheduler listening on %s", self.config.scheduler_addr)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while True:
                # Only a message (a request, an abort, a result) can make a new step possible; while
                # watched, the view goes out within 0.2 s of the figures changing.
                if poller.poll(200 if self.view.tick(time.monotonic()) else 1000):
                    # Drain everything that arrived before planning, so a step sees all new requests.
                    while True:
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) != 2:  # a member sends one frame; anything else is garbage
                            logger.warning("dropping a message of %d frames (expected 2)", len(frames))
                            continue
                        sender, frame = frames
                        msg = self.from_members.decode(frame)
                        if msg is None:
                            continue
                        try:
                            self._handle(sender.decode(errors="replace"), msg)
                        except Exception:
                            # One bad message must not end the scheduler, and with it every request.
                            logger.exception("failed to handle %s from %r", type(msg).__name__, sender)
                self._check_workers()
                self._maybe_schedule()
                self._send_stats()
                self._log_stats()
        finally:
            for group in self.groups.values():
                for member in [*group.workers.values(), *([group.draft] if group.draft else [])]:
                    self._send(member, Shutdown("scheduler stopping"))
            self.sock.close()
            self.ctx.term()


def run_scheduler(config: EngineConfig) -> None:
    logger.info("scheduler pid %d", os.getpid())
    SchedulerService(config).run()
