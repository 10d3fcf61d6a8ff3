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
from collections import defaultdict, deque
from typing import Any

import msgspec
import zmq

from protocol import (
    Abort,
    Decoder,
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
    bind_router,
    encode,
)
from protocol.messages import SchedulerInbound
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger("pagoda.scheduler")

# A worker whose heartbeats stop for this many intervals is dead (they beat from a thread, so
# a long step does not silence them).
WORKER_SILENT_HEARTBEATS = 5


class SchedulerService:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.ctx = zmq.Context()
        self.sock = bind_router(self.ctx, config.scheduler_addr)
        self.from_members = Decoder(SchedulerInbound)  # tokenizers and workers, on the one ROUTER
        # Tells tokenizers that reconnect whether this is a new scheduler, which holds none of their requests.
        self.scheduler_id = uuid.uuid4().hex
        self.scheduler: Scheduler | None = None
        self.engine_ready: EngineReady | None = None
        self.workers: dict[int, str] = {}  # rank -> member id
        self._rank0_hello: Hello | None = None  # rank 0's, of the group now joining or serving
        self.vocab_size = 0  # rank 0's, from its hello: token ids outside it are refused
        # When each attached worker's heartbeat thread last beat, and when a result last came
        # or steps went out with none in flight (the step timeout counts from there).
        self.workers_heard: dict[str, float] = {}
        self._progress_at = 0.0
        self.worker_ids: set[str] = set()  # every worker that ever said hello
        self.tokenizers: dict[str, float] = {}  # member id -> last heard
        self.max_steps_in_flight = 2 if config.async_scheduling else 1
        # Step ids sent to the workers whose results have not come back, oldest first, and
        # the step-log line of each, written once its result (and the worker's timing) is in.
        self.steps_in_flight: deque[int] = deque()
        self._step_log_lines: dict[int, dict[str, Any]] = {}
        # The worker's time, from each result; a wait only counts as idle if the scheduler had
        # work when the previous step came back (not while the server had nothing to do).
        self.worker_busy_s = 0.0
        self.worker_idle_s = 0.0
        self._had_work = False
        self.step_log = open(config.step_log, "a", buffering=1) if config.step_log else None  # noqa: SIM115
        self._last_stats = 0.0
        self._sent_stats: SchedulerStats | None = None
        self._sent_stats_at = 0.0

    # ---- sending -----------------------------------------------------------------------

    def _send(self, member_id: str, msg: msgspec.Struct) -> bool:
        try:
            self.sock.send_multipart([member_id.encode(), encode(msg)])
            return True
        except zmq.ZMQError as e:  # ROUTER_MANDATORY: the member is gone
            # At shutdown the workers may have stopped first (the same signal reached them);
            # a member already known to be gone is not worth a line per step.
            known = member_id in self.tokenizers or member_id in self.workers.values()
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
                self._on_worker_heartbeat(msg.member_id)
        elif isinstance(msg, EngineRequest):
            self._on_request(sender, msg)
        elif isinstance(msg, Abort):
            if msg.indices is not None and len(msg.indices) != len(msg.request_ids):
                logger.warning("dropping an abort of %d ids with %d indices", len(msg.request_ids), len(msg.indices))
            elif self.scheduler is not None:
                self.scheduler.abort(msg.request_ids, msg.indices)
        elif isinstance(msg, StepResult):
            self._on_result(msg)

    def _on_worker_heartbeat(self, member: str) -> None:
        if member in self.workers_heard:
            self.workers_heard[member] = time.monotonic()
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
        if msg.role != "worker":
            logger.warning("hello from unknown role %r dropped", msg.role)
            return
        if sender != f"worker-{msg.rank}" or msg.rank >= self.config.tensor_parallel_size or min(
            msg.rank, msg.num_blocks - 1, msg.max_model_len - 1, msg.vocab_size
        ) < 0:
            # A worker's identity is its rank's and it has a KV pool: any other hello would hand
            # the step loop (and every request) to a peer that never runs a step.
            logger.warning("dropping a worker hello from %r: rank %d, %d KV blocks, max_model_len %d",
                           sender, msg.rank, msg.num_blocks, msg.max_model_len)
            return
        size = self.config.tensor_parallel_size
        if size > 1 and self.workers.get(msg.rank) == sender:
            # A rank said hello again: it was restarted, and its peers, which shared a process
            # group with its predecessor, cannot go on: the whole group starts over.
            self._lose_workers(f"{sender} restarted", gone=[sender])
        self.workers[msg.rank] = sender
        self.workers_heard[sender] = time.monotonic()
        self.worker_ids.add(sender)
        logger.info(
            "worker %s (rank %d, pid %d) joined: %d KV blocks of %d tokens, max_model_len %d",
            sender, msg.rank, msg.pid, msg.num_blocks, self.config.block_size, msg.max_model_len,
        )
        if msg.rank == 0:
            self._rank0_hello = msg
        if len(self.workers) < size or self._rank0_hello is None:
            return  # a plan goes to every rank of the group, or to none
        # The group is whole: rank 0 speaks for it (every rank holds the same KV pool size).
        msg = self._rank0_hello
        self.vocab_size = msg.vocab_size
        max_model_len = msg.max_model_len
        if msg.num_blocks * self.config.block_size < max_model_len:
            max_model_len = msg.num_blocks * self.config.block_size
            logger.warning("the KV pool holds only %d tokens: max_model_len lowered to that", max_model_len)
        if self.scheduler is not None:
            # A restarted worker lost every request's KV; the scheduler still has the tokens.
            if self.scheduler.num_running:
                logger.info("%d running requests start over from their tokens", self.scheduler.num_running)
            self.scheduler.reset_worker()
            self.steps_in_flight.clear()
            self._step_log_lines.clear()
        if self.scheduler is None:
            self.scheduler = Scheduler(
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
                )
            )
        self.engine_ready = EngineReady(
            max_model_len=max_model_len,
            num_blocks=msg.num_blocks,
            block_size=self.config.block_size,
            eos_token_ids=msg.eos_token_ids,
            scheduler_id=self.scheduler_id,
        )
        for tok in self.tokenizers:
            self._send(tok, self.engine_ready)

    def _on_request(self, sender: str, msg: EngineRequest) -> None:
        if msg.scheduler_id and msg.scheduler_id != self.scheduler_id:
            # Queued for this scheduler's dead predecessor; its tokenizer re-submits it once this one is ready.
            logger.info("dropping %s, sent to a previous scheduler", msg.request_id)
            return
        if self.scheduler is None:
            self._send(sender, ErrorReply(msg.request_id, 503, "The engine is not ready yet.", "service_unavailable"))
            return
        if msg.resume and (live := self.scheduler.adopt(msg.request_id, msg.reply_to)):
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
        if (error := _unrunnable(msg, self.scheduler.config, self.vocab_size)) is not None:
            # Its tokenizer checks all this; a request that was not checked must neither crash
            # the worker (ids outside the embedding, positions past the context) nor stall the queue.
            logger.warning("refusing request %r: %s", msg.request_id, error)
            self._send(sender, ErrorReply(msg.request_id, 400, error, param="prompt"))
            return
        max_tokens = msg.sampling.max_tokens
        if max_tokens is None:
            max_tokens = self.scheduler.config.max_model_len - len(msg.prompt_token_ids)
        req = Request(msg.request_id, msg.prompt_token_ids, msg.sampling, msg.reply_to, max_tokens, msg.arrival_time)
        try:
            # Outputs so far: re-submitted by its tokenizer after this scheduler's predecessor died.
            self.scheduler.add_request(req, msg.output_token_ids, msg.finished_samples)
        except ValueError as e:
            self._send(sender, ErrorReply(msg.request_id, 400, str(e), param="request_id"))

    def _on_result(self, result: StepResult) -> None:
        # A restarted scheduler gets the results its predecessor's worker still had queued: none is in flight.
        if self.scheduler is None or not self.steps_in_flight or result.step_id != self.steps_in_flight[0]:
            logger.warning("dropping the result of step %d, which is not in flight", result.step_id)
            return
        self.steps_in_flight.popleft()
        self._progress_at = time.monotonic()
        self.worker_busy_s += result.execute_s
        if self._had_work:
            self.worker_idle_s += result.idle_s
        update = self.scheduler.update(result)
        self._had_work = self.scheduler.has_work
        self._write_step_log(result)
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
        """Send plans until `max_steps_in_flight` are out or there is nothing to run."""
        if self.scheduler is None or len(self.workers) < self.config.tensor_parallel_size:
            return
        while len(self.steps_in_flight) < self.max_steps_in_flight:
            plan = self.scheduler.schedule()
            if plan is None:
                return
            unreachable = [m for _, m in sorted(self.workers.items()) if not self._send(m, plan)]
            if unreachable:
                self._lose_workers(f"{', '.join(unreachable)} cannot be reached", gone=unreachable)
                return
            if self.step_log is not None:
                self._step_log_lines[plan.step_id] = self._plan_log_line(plan)
            if not self.steps_in_flight:
                self._progress_at = time.monotonic()  # the step timeout counts from here
            self.steps_in_flight.append(plan.step_id)

    def _check_workers(self) -> None:
        """Declare the worker group lost when a member is silent or its steps never come back."""
        if not self.workers:
            return
        now = time.monotonic()
        silent_after = WORKER_SILENT_HEARTBEATS * self.config.heartbeat_interval_s
        silent = [m for m, heard in self.workers_heard.items() if now - heard > silent_after]
        if silent:
            self._lose_workers(f"{', '.join(silent)} silent for over {silent_after:g} s", gone=silent)
        elif self.steps_in_flight and now - self._progress_at > self.config.step_timeout_s:
            self._lose_workers(f"no step result for over {self.config.step_timeout_s:g} s (--step-timeout-s)")

    def _lose_workers(self, reason: str, gone: list[str] | None = None) -> None:
        """The worker group died or hangs: its requests wait, to be recomputed from their
        tokens once a worker says hello again; tokenizers hear that nothing runs meanwhile.

        `gone`: members taken for dead, not told to stop: their identity may already be a
        restarted member's, whose hello is on its way.
        """
        running = self.scheduler.num_running if self.scheduler is not None else 0
        logger.warning("lost the worker group (%s): %d running requests wait for a worker to say hello",
                       reason, running)
        # The others exit (a hung one when it wakes up) and are restarted, to rejoin with a hello.
        for member in self.workers.values():
            if member not in (gone or []):
                self._send(member, Shutdown(f"worker group lost: {reason}"))
        self.workers.clear()
        self.workers_heard.clear()
        self._rank0_hello = None
        self.steps_in_flight.clear()
        self._step_log_lines.clear()
        if self.scheduler is not None:
            self.scheduler.reset_worker()
        if self.engine_ready is not None:
            self.engine_ready = msgspec.structs.replace(self.engine_ready, serving=False)
            for tok in self.tokenizers:
                self._send(tok, self.engine_ready)

    def _plan_log_line(self, plan: StepPlan) -> dict[str, Any]:
        s = self.scheduler
        assert s is not None
        return {
            "step": plan.step_id,
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
            "prefix_cache_queries": s.kv.num_queries,
            "prefix_cache_hits": s.kv.num_hits,
            "in_flight": len(self.steps_in_flight),  # steps the worker had yet to finish
        }

    def _write_step_log(self, result: StepResult) -> None:
        """One JSON line per step, written when its result is back: the plan and the worker's timing."""
        line = self._step_log_lines.pop(result.step_id, None)
        if self.step_log is None or line is None:
            return
        line["worker_idle_s"] = round(result.idle_s, 6)
        line["worker_execute_s"] = round(result.execute_s, 6)
        self.step_log.write(json.dumps(line) + "\n")

    def stats(self) -> SchedulerStats:
        s = self.scheduler
        if s is None:
            return SchedulerStats()
        return SchedulerStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.block_pool.usage,
            prefix_cache_queries=s.kv.num_queries,
            prefix_cache_hits=s.kv.num_hits,
            num_preemptions=s.num_preemptions,
            num_steps=s.num_steps,
            worker_busy_s=self.worker_busy_s,
            worker_idle_s=self.worker_idle_s,
            num_held=len(s.requests) + len(s.samples) + len(s.pending_forks),
        )

    def _send_stats(self) -> None:
        """Tell every tokenizer the figures when they changed, at most every 0.2 s."""
        now = time.monotonic()
        if now - self._sent_stats_at < 0.2:
            return
        stats = self.stats()
        if stats == self._sent_stats:
            return
        for tok in self.tokenizers:
            self._send(tok, stats)
        self._sent_stats, self._sent_stats_at = stats, now

    def _log_stats(self) -> None:
        now = time.monotonic()
        if self.scheduler is None or now - self._last_stats < 10.0 or not self.scheduler.has_work:
            return
        self._last_stats = now
        logger.info(
            "running %d, waiting %d, KV usage %.1f%%, preemptions %d",
            self.scheduler.num_running, self.scheduler.num_waiting,
            100 * self.scheduler.block_pool.usage, self.scheduler.num_preemptions,
        )

    def run(self) -> None:
        logger.info("scheduler listening on %s", self.config.scheduler_addr)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while True:
                # Only a message (a request, an abort, a result) can make a new step possible.
                if poller.poll(1000):
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
            for member in list(self.workers.values()):
                self._send(member, Shutdown("scheduler stopping"))
            self.sock.close()
            self.ctx.term()


def _unrunnable(msg: EngineRequest, config: SchedulerConfig, vocab_size: int) -> str | None:
    """Why the worker could not run `msg`, or None."""
    prompt, max_tokens = msg.prompt_token_ids, msg.sampling.max_tokens
    if not prompt:
        return "the prompt is empty"
    if any(not 0 <= t < (vocab_size or 2**64) for ids in (prompt, *msg.output_token_ids) for t in ids):
        return f"token ids must be in [0, {vocab_size or 'the vocabulary size'})"
    if len(prompt) + max(1, max_tokens or 0) > config.max_model_len:
        return f"the prompt and max_tokens take more than the context of {config.max_model_len} tokens"
    # Each sample holds a KV block of its own when it runs: more than the pool has is no real
    # request, and an n of billions would stall this loop making them.
    if not 1 <= msg.sampling.n <= config.num_blocks:
        return f"n must be between 1 and {config.num_blocks}"
    # The worker keeps these in int64 columns.
    p = msg.sampling
    if any(not -(2**63) <= v < 2**63 for v in (p.top_k, p.min_tokens, p.logprobs or 0)):
        return "top_k, min_tokens and logprobs must fit in 64-bit signed integers"
    return None


def run_scheduler(config: EngineConfig) -> None:
    logger.info("scheduler pid %d", os.getpid())
    SchedulerService(config).run()
