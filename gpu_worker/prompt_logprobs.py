"""Prompt logprobs (vLLM's `prompt_logprobs`): how likely the model found each prompt token.

For a request that asks for them, every prefill chunk runs the LM head on all its positions,
not only the last one: position p gives log p(prompt token p + 1) under the raw logits (fp32
log_softmax, before any sampling parameter, as vLLM), that token's rank in the vocabulary and
the k most likely tokens. A chunk [start, end) of a P-token prompt thus covers prompt tokens
start + 1 .. min(end, P - 1): its last position's target is the next chunk's first token, which
the worker has (the whole prompt came with the request); position P - 1 predicts the first
output, which is the sampler's. The first prompt token has no entry.

A request resumed with outputs (preempted, or re-submitted to a restarted scheduler) had its
prompt logprobs sent with its first output already, so it computes none. The scheduler never
gives these requests prefix-cache hits, so every prompt position is computed here.

Memory: the positions go through the LM head in slices of at most `MAX_LOGITS_ELEMENTS` logits,
so a chunk of the whole step budget over a large vocabulary never holds its [chunk, vocab] fp32
logits at once. Nothing here waits for the device: the results reach the host through
non-blocking copies issued before the step's event, and are read in `collect` when the step is
finished, like the sampled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gpu_worker.sampling_metadata import MAX_LOGPROBS
from gpu_worker.transfer import to_device
from protocol.messages import PromptLogprobs, StepPlan

if TYPE_CHECKING:
    from gpu_worker.input_batch import InputBatch, StepBatch

# Logits computed at once (fp32 and its log_softmax): 2^26 floats, 256 MiB, ~440 positions of a
# 152k vocabulary.
MAX_LOGITS_ELEMENTS = 1 << 26


@dataclass
class _Run:
    """One request's prompt positions in a step."""

    request_id: str
    first: int  # the prompt token its first entry is about
    count: int
    k: int


@dataclass
class PendingPromptLogprobs:
    """A step's prompt logprobs, on their way to the host."""

    runs: list[_Run]
    token_logprobs: torch.Tensor  # [N] fp32
    token_ranks: torch.Tensor  # [N] int64
    top_ids: torch.Tensor  # [N, k_max]
    top_logprobs: torch.Tensor  # [N, k_max]

    def result(self) -> dict[str, PromptLogprobs]:
        """By request id (the step must be finished: its copies have run)."""
        lps, ranks = self.token_logprobs.tolist(), self.token_ranks.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        out, at = {}, 0
        for run in self.runs:
            rows = slice(at, at + run.count)
            out[run.request_id] = PromptLogprobs(
                run.first, lps[rows], ranks[rows],
                [ids[: run.k] for ids in top_ids[rows]], [v[: run.k] for v in top_lps[rows]],
            )
            at += run.count
        return out


class PromptLogprobsTracker:
    """Which requests still have prompt positions to return, and each step's computation."""

    def __init__(self) -> None:
        self.wanted: dict[str, int] = {}  # request id -> k, until its last prompt position is computed
        self._pending: dict[int, PendingPromptLogprobs] = {}  # by step id, until collected

    def update(self, plan: StepPlan) -> None:
        """Requests that left, and new ones asking for prompt logprobs (not resumed with outputs)."""
        for request_id in plan.finished_request_ids:
            self.wanted.pop(request_id, None)
        for new in plan.new_requests:
            self.wanted.pop(new.request_id, None)
            k = new.sampling.prompt_logprobs
            if k is not None and new.num_output_tokens == 0:
                self.wanted[new.request_id] = min(max(k, 0), MAX_LOGPROBS)

    def launch(
        self, plan: StepPlan, model: torch.nn.Module, hidden: torch.Tensor, batch: StepBatch, input_batch: InputBatch
    ) -> None:
        """Start computing the plan's prompt logprobs from its step's final hidden states [T, hidden]
        (`batch` was prepared: the input batch's `num_computed` counts this step's tokens)."""
        if not self.wanted:
            return
        runs: list[_Run] = []
        indices: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        offset = 0
        for request_id, row in zip(batch.request_ids, batch.rows):
            count = plan.num_scheduled_tokens[request_id]
            k = self.wanted.get(request_id)
            if k is not None:
                end, num_prompt = int(input_batch.num_computed[row]), int(input_batch.num_prompt_tokens[row])
                start, last = end - count, min(end, num_prompt - 1)
                if last > start:
                    runs.append(_Run(request_id, start + 1, last - start, k))
                    indices.append(np.arange(offset, offset + last - start))
                    targets.append(input_batch.token_ids[row, start + 1 : last + 1])
                if end >= num_prompt - 1:
                    del self.wanted[request_id]  # its last prompt position is computed
            offset += count
        if runs:
            self._pending[plan.step_id] = self._compute(model, hidden, runs, np.concatenate(indices),
                                                   np.concatenate(targets))

    def collect(self, step_id: int) -> dict[str, PromptLogprobs] | None:
        """The finished step's prompt logprobs by request id; None if it computed none."""
        pending = self._pending.pop(step_id, None)
        return None if pending is None else pending.result()

    @staticmethod
    def _compute(
        model: torch.nn.Module, hidden: torch.Tensor, runs: list[_Run], indices: np.ndarray, targets: np.ndarray
    ) -> PendingPromptLogprobs:
        device = hidden.device
        index = to_device(indices, device)
        target = to_device(targets.astype(np.int64), device)
        k_max = max(run.k for run in runs)
        parts: list[tuple[torch.Tensor, ...]] = []
        step = max(1, MAX_LOGITS_ELEMENTS // model.config.vocab_size)
        for at in range(0, len(indices), step):
            part = slice(at, at + step)
            logprobs = model.compute_logits(hidden[index[part]]).float().log_softmax(dim=-1)
            chosen = logprobs.gather(1, target[part, None])
            # vLLM's rank: how many tokens are at least as likely (1: the most likely).
            ranks = (logprobs >= chosen).sum(dim=-1)
            top = logprobs.topk(min(k_max, logprobs.shape[-1]), dim=-1)
            parts.append((chosen[:, 0], ranks, top.indices, top.values))
        lps, ranks, top_ids, top_lps = (torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts))
        return PendingPromptLogprobs(
            runs, *(t.to("cpu", non_blocking=True) for t in (lps, ranks, top_ids, top_lps))
        )
