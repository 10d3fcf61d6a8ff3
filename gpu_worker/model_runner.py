"""The model runner: the worker's model, its KV cache, and one step per `StepPlan`.

The worker keeps each running request's tokens and block table across steps (the input
batch), so a `StepPlan` carries only what changed (vLLM v1's design). A step flattens the
scheduled tokens of all requests into one batch, runs the model once (a CUDA graph replay
where one was captured for its shape), and samples one token for every request whose known
tokens are now all computed: prepare -> forward -> sample -> hand back.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from gpu_worker.cuda_graphs import CudaGraphs, cudagraph_sizes, mixed_graph_sizes, warm_up_kernels
from gpu_worker.input_batch import InputBatch, PendingStep, StepBatch
from gpu_worker.kv_cache import KVCache
from gpu_worker.loader import ModelLoadError, load_model
from gpu_worker.parallel import group_init_method, init_tensor_parallel
from gpu_worker.prompt_logprobs import PromptLogprobsTracker
from gpu_worker.sampler import Sampler, SamplerOutput
from gpu_worker.spec_decode.verify import verify_drafts
from gpu_worker.structured_outputs import GrammarMask, GrammarRows
from gpu_worker.transfer import to_device
from kernels import decodes_longest_first
from protocol.config import EngineConfig
from protocol.messages import StepPlan, StepResult


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, group: int = 0, context_limit: int | None = None) -> None:
        """`context_limit`: serve at most this context (a draft worker: the target's), whatever
        the model's positions allow."""
        self.config = config
        self.rank = rank
        # Group G's ranks take GPUs G * tp ... G * tp + tp - 1 (all of them share GPUs modulo
        # the count, e.g. two groups on one GPU with half its memory each).
        self.device = resolve_device(config.device, group * config.tensor_parallel_size + rank)
        # Every rank seeds alike: they sample the same tokens from the same gathered logits.
        torch.manual_seed(config.seed)
        init_tensor_parallel(
            rank, config.tensor_parallel_size, group_init_method(config.distributed_init_method, group),
            self.device, config.step_timeout_s,
        )
        loaded = load_model(config, self.device)
        self.model = loaded.model
        self.eos_token_ids = loaded.eos_token_ids
        self.block_size = config.block_size
        self.max_num_batched_tokens = config.token_budget(on_gpu=self.device.type == "cuda")
        self.max_model_len = config.max_model_len or loaded.max_position_embeddings
        if context_limit is not None:
            self.max_model_len = min(self.max_model_len, context_limit)
        if self.max_model_len > loaded.max_position_embeddings:
            raise ModelLoadError(
                f"max_model_len {self.max_model_len} is more than the model's "
                f"{loaded.max_position_embeddings} positions"
            )
        self.kv_cache = KVCache(config, loaded, self.device, self.max_model_len, self.max_num_batched_tokens)
        self.num_blocks = self.kv_cache.num_blocks
        self.grammars = GrammarRows(config, self.eos_token_ids)  # structured outputs' matchers
        attn = loaded.model.attention_layers()[0]
        self.input_batch = InputBatch(
            config.max_num_seqs, self.max_model_len, self.block_size, self.max_num_batched_tokens,
            self.device, self.eos_token_ids, self.grammars,
            longest_decodes_first=decodes_longest_first(attn.num_heads, attn.k_cache, attn.v_cache),
        )
        self.sampler = Sampler()
        self.prompt_logprobs = PromptLogprobsTracker()
        self.graphs = CudaGraphs(self.model, lambda: self.input_batch.buffers, self.max_model_len)
        if self.device.type == "cuda":
            warm_up_kernels(self.model)
            if not config.enforce_eager:
                if (mixed := mixed_graph_tokens(config)) > 0:  # the larger graphs first, into the shared pool
                    max_tokens = min(mixed, self.input_batch.buffers.max_tokens)
                    self.graphs.capture_mixed(mixed_graph_sizes(max_tokens))
                self.graphs.capture_decode(cudagraph_sizes(config.max_num_seqs))

    def execute(self, plan: StepPlan) -> StepResult:
        """Apply the plan's differences, run its tokens, and return the tokens sampled."""
        return self.finish(self.launch(plan))

    def launch(self, plan: StepPlan) -> PendingStep:
        """Start the plan's step on the device and return without waiting for it.

        At most one earlier step may be unfinished: its sampled tokens are still on the
        device, and the decodes of this step read them from there. `finish` each launched
        step, in order, to get its StepResult.
        """
        began = time.perf_counter()
        self.input_batch.update(plan)
        self.prompt_logprobs.update(plan)
        if plan.block_copies:
            self.kv_cache.copy_blocks(plan.block_copies)
        if not plan.num_scheduled_tokens:
            return self._empty_step(plan.step_id, began)
        batch = self.input_batch.prepare(plan.num_scheduled_tokens, self.graphs)
        prev = self.input_batch.unfinished
        if batch.num_logits is not None:
            return self._speculative_step(plan, batch, prev, began)
        if prev is not None and self.input_batch.needs_history(batch):
            self.finish(prev)  # the penalties read every token so far on the host
        with torch.inference_mode():
            hidden = self._forward(batch)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
            grammar = self._grammar_mask(batch, prev)
            out = self.sampler(logits, self.input_batch.sampling_metadata(batch), grammar)
            self.prompt_logprobs.launch(plan, self.model, hidden, batch, self.input_batch)
        return self._hand_back(plan.step_id, batch, out, began)

    def _speculative_step(
        self, plan: StepPlan, batch: StepBatch, prev: PendingStep | None, began: float
    ) -> PendingStep:
        """A step where some requests carry draft tokens: run to its end before returning (the
        next step's inputs depend on how many drafts are kept). Rows with drafts are verified
        (gpu_worker/spec_decode/verify.py); the others sample as in any step."""
        if prev is not None:
            self.finish(prev)
        assert batch.num_logits is not None
        with torch.inference_mode():
            hidden = self._forward(batch)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
            self.prompt_logprobs.launch(plan, self.model, hidden, batch, self.input_batch)
            ends = np.cumsum(batch.num_logits)
            spec = np.flatnonzero(batch.num_logits > 1)
            plain = np.flatnonzero(batch.num_logits == 1)
            tokens: list[list[int]] = [[] for _ in range(len(ends))]
            out = None
            if len(plain):
                sub = dataclasses.replace(batch, sampling=batch.sampling[plain], sampled_rows=batch.sampled_rows[plain])
                grammar = self._grammar_mask(sub, None)
                plain_logits = logits[to_device(ends[plain] - 1, self.device)]
                out = self.sampler(plain_logits, self.input_batch.sampling_metadata(sub), grammar)
                for i, token in zip(plain.tolist(), out.token_ids.tolist(), strict=True):
                    tokens[i] = [token]
            if len(spec):
                rows = batch.sampled_rows[spec]
                drafts = [
                    self.input_batch.token_ids[row, n : n + d]
                    for row, n, d in zip(rows, self.input_batch.num_tokens[rows], batch.num_logits[spec] - 1)
                ]
                firsts = ends[spec] - batch.num_logits[spec]
                params = [self.input_batch.sampling.params[row] for row in rows]
                for i, kept in zip(spec.tolist(), verify_drafts(logits, firsts, drafts, params), strict=True):
                    tokens[i] = kept
        rows = batch.sampled_rows
        if self.grammars and len(plain):
            self.grammars.advance(rows[plain], [tokens[i][0] for i in plain])
        self.input_batch.append_tokens(rows, tokens)
        request_ids = [batch.request_ids[i] for i in batch.sampling]
        result = StepResult(
            step_id=plan.step_id,
            request_ids=[rid for rid, t in zip(request_ids, tokens) for _ in t],
            token_ids=[token for t in tokens for token in t],
            prompt_logprobs=self.prompt_logprobs.collect(plan.step_id),
        )
        if out is not None and out.logprobs is not None:
            # One entry per result row; rows with drafts never ask for logprobs (placeholders).
            assert out.top_logprob_ids is not None and out.top_logprobs is not None
            lp, ids, top = out.logprobs.tolist(), out.top_logprob_ids.tolist(), out.top_logprobs.tolist()
            where = {i: j for j, i in enumerate(plain.tolist())}
            result.logprobs, result.top_logprob_ids, result.top_logprobs = [], [], []
            for i, t in enumerate(tokens):
                j = where.get(i)
                for _ in t:
                    result.logprobs.append(lp[j] if j is not None else 0.0)
                    result.top_logprob_ids.append(ids[j] if j is not None else [])
                    result.top_logprobs.append(top[j] if j is not None else [])
        step = PendingStep(plan.step_id, request_ids, rows, self.input_batch.num_tokens[rows].copy())
        step.result = result
        result.execute_s = time.perf_counter() - began
        return step

    def _grammar_mask(self, batch: StepBatch, prev: PendingStep | None) -> GrammarMask | None:
        """The structured-output masks of the batch's constrained rows, made on the host while
        the device runs the forward just launched: the previous step's tokens are waited for
        here (they come before this forward on the stream), as the masks follow them."""
        positions = self.grammars.constrained(batch.sampled_rows)
        if len(positions) == 0:
            return None
        if prev is not None:
            self.finish(prev)
        return self.grammars.mask(batch.sampled_rows, self.device, positions)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        if batch.graph is not None:
            return self.graphs.replay(batch.graph)
        return self.model(batch.input_ids, batch.positions, batch.attn)

    def _empty_step(self, step_id: int, began: float) -> PendingStep:
        step = PendingStep(step_id, [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        step.result = StepResult(step_id=step_id, request_ids=[], token_ids=[])
        step.result.execute_s = time.perf_counter() - began
        return step

    def _hand_back(self, step_id: int, batch: StepBatch, out: SamplerOutput, began: float) -> PendingStep:
        """Start the sampled tokens' copy to the host; `finish` reads them once they are there."""
        rows = batch.sampled_rows
        step = PendingStep(
            step_id,
            [batch.request_ids[i] for i in batch.sampling],
            rows,
            self.input_batch.num_tokens[rows].copy(),
            device_tokens=out.token_ids,
            launch_s=time.perf_counter() - began,
        )
        self.input_batch.sampled(step)
        step.host_tokens = batch.staging.sampled[: len(rows)]
        step.host_tokens.copy_(out.token_ids, non_blocking=True)
        if out.logprobs is not None:
            assert out.top_logprob_ids is not None and out.top_logprobs is not None
            step.logprobs = (
                out.logprobs.to("cpu", non_blocking=True),
                out.top_logprob_ids.to("cpu", non_blocking=True),
                out.top_logprobs.to("cpu", non_blocking=True),
            )
        if self.device.type == "cuda":
            step.event = torch.cuda.Event()
            step.event.record()  # after every copy to the host above
        return step

    def step_done(self, step: PendingStep) -> bool:
        """Whether `finish(step)` would return without waiting for the device."""
        return step.result is not None or step.event is None or step.event.query()

    def finish(self, step: PendingStep) -> StepResult:
        """Wait for a launched step's sampled tokens, record them, and return its result."""
        if step.result is not None:
            return step.result
        began = time.perf_counter()
        if step.event is not None:
            step.event.synchronize()
        assert step.host_tokens is not None
        token_ids = step.host_tokens.tolist()
        self.input_batch.tokens_arrived(step, token_ids)
        logprobs, top_ids, top_logprobs = (t.tolist() for t in step.logprobs) if step.logprobs else (None,) * 3
        step.result = StepResult(
            step_id=step.step_id,
            request_ids=step.request_ids,
            token_ids=token_ids,
            logprobs=logprobs,
            top_logprob_ids=top_ids,
            top_logprobs=top_logprobs,
            prompt_logprobs=self.prompt_logprobs.collect(step.step_id),
        )
        step.host_tokens = step.device_tokens = None
        step.result.execute_s = step.launch_s + time.perf_counter() - began
        step.result.idle_s = step.idle_s
        return step.result


def mixed_graph_tokens(config: EngineConfig) -> int:
    """Up to how many tokens steps with more than one token per sequence replay CUDA graphs:
    `cuda_graph_mixed_tokens`, or with speculative decoding at least a verification step's size
    (1 + k tokens for each of up to disable_by_batch_size requests): eager, a verification
    forward of llama3-8b took 33.8 ms on the H200 against 3.9 ms for a decode graph."""
    spec = config.speculative
    if spec is None:
        return config.cuda_graph_mixed_tokens
    return max(config.cuda_graph_mixed_tokens, (1 + spec.num_speculative_tokens) * spec.disable_by_batch_size)


def resolve_device(device: str, index: int) -> torch.device:
    """The device for `device`, where "auto" is GPU `index` (modulo the count) if CUDA is
    available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device(device)
