"""The draft-model worker (speculative decoding, method "draft_model"): `pagoda draft-worker`.

A process of its own beside a worker group, holding the draft model and a paged KV cache with
the group's block ids: the scheduler owns one block table per request, and the draft's cache
mirrors the target's block for block (the target's KV pool size comes in `DraftSetup`, the
answer to the first hello). For each step with drafts the scheduler sends a `DraftPlan`: every
request's tokens, how many of them the draft's cache holds, its block table and how many
drafts. The draft worker first computes the tokens its cache lacks (the catch-up: the prompt
the first time, afterwards the target's own token and the drafts it kept), which gives the
first draft, then decodes the others one step each, and answers with the greedy tokens.

It holds no request between plans (each plan's requests are added to its model runner and
dropped at the end): a restarted draft worker only needs its cache refilled, which the
scheduler arranges by counting every request's draft-computed tokens from 0 again. While it is
gone, the group decodes without drafts.

Greedy drafts are one-hot proposals: the target's rejection sampler keeps its own
distribution exactly whatever the draft proposes (gpu_worker/spec_decode/rejection_sampler.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

import msgspec
import zmq

from gpu_worker.service import _Drain, _heartbeat_socket, _heartbeats
from protocol import (
    CachedRequestData,
    Decoder,
    DraftPlan,
    DraftResult,
    DraftSetup,
    EngineConfig,
    Hello,
    NewRequestData,
    SamplingParams,
    Shutdown,
    StepPlan,
    StepResult,
    connect_dealer,
    encode,
)
from protocol.messages import DraftWorkerInbound, draft_worker_id

if TYPE_CHECKING:
    from gpu_worker.input_batch import PendingStep
    from gpu_worker.model_runner import ModelRunner

logger = logging.getLogger("pagoda.draft")

GREEDY = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
DRAFT_MIXED_GRAPH_TOKENS = 32


class DraftVocabularyError(ValueError):
    pass


def draft_engine_config(config: EngineConfig, setup: DraftSetup) -> EngineConfig:
    """The engine configuration the draft model runs under: its own model, one rank, exactly
    the target's KV block count."""
    spec = config.speculative
    assert spec is not None and spec.model
    return msgspec.structs.replace(
        config, model=spec.model, tokenizer=None, revision=None, served_model_name=None, max_model_len=None,
        num_gpu_blocks_override=setup.num_blocks, tensor_parallel_size=1, data_parallel_size=1,
        speculative_config=None,
        # A GPTQ / AWQ target names its checkpoint's format; the draft's own config.json says its.
        quantization=None if config.quantization in ("gptq", "awq") else config.quantization,
        # The catch-up steps (the target's token and the kept drafts of up to
        # disable_by_batch_size requests) replay CUDA graphs like the decode steps.
        cuda_graph_mixed_tokens=max(config.cuda_graph_mixed_tokens, DRAFT_MIXED_GRAPH_TOKENS),
    )


def check_vocabulary(draft_vocab: int, target_vocab: int, model: str) -> None:
    if draft_vocab != target_vocab:
        raise DraftVocabularyError(
            f"speculative_config: the draft model {model} has a vocabulary of {draft_vocab} tokens, the target's "
            f"has {target_vocab}: a draft must share the target's vocabulary"
        )


class Drafter:
    """Greedy drafts from a model runner over the group's block ids (see the module docstring)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._step_id = 0

    def _plan(self, new: list[NewRequestData], cached: list[CachedRequestData], scheduled: dict[str, int],
              finished: list[str] | None = None) -> StepPlan:
        self._step_id += 1
        return StepPlan(self._step_id, new, cached, scheduled, finished or [])

    def propose(self, plan: DraftPlan) -> DraftResult:
        began = time.perf_counter()
        runner = self.runner
        drafts: dict[str, list[int]] = {q.request_id: [] for q in plan.requests}
        # What each request's cache holds; its last known token is always computed again (its
        # logits give the first draft).
        computed = {q.request_id: max(0, min(q.num_computed_tokens, len(q.token_ids) - 1)) for q in plan.requests}
        started: set[str] = set()
        pending = list(plan.requests)
        while pending:  # the catch-up, in chunks of the runner's token budget
            new, cached, scheduled = [], [], {}
            left = runner.max_num_batched_tokens
            for q in pending:
                if left <= 0:
                    break
                rid = q.request_id
                n = min(len(q.token_ids) - computed[rid], left)
                if rid in started:
                    cached.append(CachedRequestData(rid, [], computed[rid]))
                else:
                    new.append(NewRequestData(rid, q.token_ids, GREEDY, q.block_ids, computed[rid]))
                    started.add(rid)
                scheduled[rid] = n
                computed[rid] += n
                left -= n
            self._collect(runner.execute(self._plan(new, cached, scheduled)), drafts)
            pending = [q for q in pending if computed[q.request_id] < len(q.token_ids)]
        # Then one decode step per further draft, each launched before the previous one is
        # finished (its tokens are read on the device).
        prev: PendingStep | None = None
        for i in range(1, max((q.num_drafts for q in plan.requests), default=0)):
            wanted = [q for q in plan.requests if q.num_drafts > i]
            step = runner.launch(self._plan(
                [], [CachedRequestData(q.request_id, [], len(q.token_ids) + i - 1) for q in wanted],
                {q.request_id: 1 for q in wanted},
            ))
            if prev is not None:
                self._collect(runner.finish(prev), drafts)
            prev = step
        if prev is not None:
            self._collect(runner.finish(prev), drafts)
        runner.execute(self._plan([], [], {}, finished=[q.request_id for q in plan.requests]))
        return DraftResult(plan.step_id, drafts, execute_s=time.perf_counter() - began)

    @staticmethod
    def _collect(result: StepResult, drafts: dict[str, list[int]]) -> None:
        for rid, token in zip(result.request_ids, result.token_ids, strict=True):
            drafts[rid].append(token)


def _load(config: EngineConfig, group: int, setup: DraftSetup) -> ModelRunner:
    from gpu_worker.model_runner import ModelRunner

    runner = ModelRunner(draft_engine_config(config, setup), rank=0, group=group, context_limit=setup.max_model_len)
    assert config.speculative is not None
    check_vocabulary(runner.model.config.vocab_size, setup.vocab_size, config.speculative.model or "")
    return runner


def run_draft_worker(config: EngineConfig, group: int = 0) -> None:
    from tokenizer_svc.model_source import ModelLoadError

    spec = config.speculative
    if spec is None or spec.method != "draft_model":
        raise SystemExit('pagoda draft-worker: --speculative-config must name method "draft_model" and its model')
    member_id = draft_worker_id(group)
    ctx = zmq.Context()
    beat_sock, beat_monitor = _heartbeat_socket(ctx, config, member_id)
    sock = connect_dealer(ctx, config.scheduler_addr, member_id, config)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeats, args=(beat_sock, beat_monitor, config, member_id, stop, _Drain()), daemon=True
    )
    beat.start()
    sock.send(encode(Hello(role="draft", member_id=member_id, pid=os.getpid(), group=group)))
    logger.info("%s (pid %d) waiting for the scheduler's setup (draft model %s)", member_id, os.getpid(), spec.model)
    from_scheduler = Decoder(DraftWorkerInbound)
    drafter: Drafter | None = None
    try:
        while True:
            msg = from_scheduler.decode(sock.recv())
            if isinstance(msg, Shutdown):
                logger.info("%s: told to stop (%s)", member_id, msg.reason)
                break
            if isinstance(msg, DraftSetup) and drafter is None:
                try:
                    runner = _load(config, group, msg)
                except (ModelLoadError, DraftVocabularyError) as e:
                    logger.error("%s", e)  # the user's mistake, in one line
                    raise SystemExit(1) from None
                drafter = Drafter(runner)
                sock.send(encode(Hello(
                    role="draft", member_id=member_id, pid=os.getpid(), num_blocks=runner.num_blocks,
                    max_model_len=runner.max_model_len, vocab_size=runner.model.config.vocab_size, group=group,
                )))
                logger.info("%s ready: %d KV blocks mirrored, context %d", member_id, runner.num_blocks,
                            runner.max_model_len)
            elif isinstance(msg, DraftPlan) and drafter is not None:
                sock.send(encode(drafter.propose(msg)))
    finally:
        stop.set()
        beat.join()
        sock.close()
        ctx.term()
