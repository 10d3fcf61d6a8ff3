"""The sampler: one token for every row of logits, each row with its own parameters.

The logits go through, in vLLM's order: the structured-output mask (tokens a constrained
row's grammar forbids at -inf), logit bias and the min_tokens mask (EOS and
`stop_token_ids` banned until enough tokens are out), then the repetition, frequency and
presence penalties. Greedy rows take the exact argmax of what is left. The others go through
temperature, min-p, top-k and top-p, then draw with the exponential race (argmax of p / E,
E ~ Exp(1)), which samples from p without a device-to-host sync.

A seeded row draws its noise from a generator seeded with (seed, output position), so its
tokens depend only on its seed and its logits: never on the batch around it, and not on a
preemption either (the resumed request draws the same noise at the same position).

Logprobs are those of the model's raw logits (vLLM's default), before any of the above.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from gpu_worker.sampling_metadata import MAX_LOGPROBS, Penalties, RandomRows, SamplingMetadata
from gpu_worker.structured_outputs import GrammarMask, apply_grammar_mask
from gpu_worker.transfer import to_device
from kernels import argmax_rows


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] fp32: log p(chosen token) under the model's own logits
    top_logprob_ids: torch.Tensor | None  # [N, k] the k most likely tokens, best first
    top_logprobs: torch.Tensor | None  # [N, k]


class Sampler:
    """`Sampler()(logits, metadata)`: one token per row of `logits` [N, vocab].

    The logits may come in the model's dtype: a batch of plain argmax rows reads them as they
    are (the argmax of bf16 values is the argmax of their exact fp32 copies); anything else
    is computed in fp32.
    """

    def __call__(
        self, logits: torch.Tensor, meta: SamplingMetadata, grammar: GrammarMask | None = None
    ) -> SamplerOutput:
        """`grammar`: the structured-output rows' allowed tokens; the rest are forbidden first."""
        if meta.plain_argmax:
            if grammar is not None:
                logits = apply_grammar_mask(logits, grammar)
            return SamplerOutput(argmax_rows(logits), None, None, None)
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        if grammar is not None:
            logits = apply_grammar_mask(logits, grammar)

        logits = apply_logit_bias(logits, meta.logit_bias)
        logits = apply_min_tokens(logits, meta.banned)
        if meta.penalties is not None:
            logits = apply_penalties(logits, meta.penalties)

        chosen = argmax_rows(logits)
        if meta.random is not None:
            chosen[meta.random.index] = sample_random(logits[meta.random.index], meta.random)

        if raw_logprobs is None:
            return SamplerOutput(chosen, None, None, None)
        assert meta.max_num_logprobs is not None
        k = min(meta.max_num_logprobs, MAX_LOGPROBS, logits.shape[-1])
        top = raw_logprobs.topk(k, dim=-1)
        return SamplerOutput(chosen, raw_logprobs.gather(1, chosen[:, None])[:, 0], top.indices, top.values)


def apply_logit_bias(logits: torch.Tensor, bias: tuple[list[int], list[int], list[float]] | None) -> torch.Tensor:
    """Add each (row, token, bias) entry; token ids outside the vocabulary are ignored."""
    if bias is None:
        return logits
    entries = [(r, t, b) for r, t, b in zip(*bias) if 0 <= t < logits.shape[1]]
    if not entries:
        return logits
    rows, cols, values = zip(*entries)
    index = (to_device(rows, logits.device), to_device(cols, logits.device))
    return logits.index_put(index, to_device(values, logits.device, logits.dtype), accumulate=True)


def apply_min_tokens(logits: torch.Tensor, banned: tuple[list[int], list[int]] | None) -> torch.Tensor:
    """Ban each (row, token): EOS and the stop tokens of rows below their `min_tokens`."""
    if banned is None:
        return logits
    entries = [(r, t) for r, t in zip(*banned) if 0 <= t < logits.shape[1]]
    if not entries:
        return logits
    rows, cols = zip(*entries)
    index = (to_device(rows, logits.device), to_device(cols, logits.device))
    return logits.index_put(index, torch.full((), float("-inf"), device=logits.device))


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output tokens, frequency and presence over outputs."""
    device, vocab_size = logits.device, logits.shape[1]
    output_counts = _bincount_rows(penalties.output_ids, vocab_size, device)
    output_mask = output_counts > 0
    penalized = logits[penalties.index]
    if penalties.repetition is not None:
        seen = (_bincount_rows(penalties.prompt_ids, vocab_size, device) > 0) | output_mask
        factor = torch.where(seen, penalties.repetition[:, None], 1.0)
        penalized = torch.where(penalized > 0, penalized / factor, penalized * factor)
    penalized = penalized - penalties.frequency[:, None] * output_counts - penalties.presence[:, None] * output_mask
    logits = logits.clone()
    logits[penalties.index] = penalized
    return logits


def _bincount_rows(lists: list[np.ndarray], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(lists), vocab] counts of each token id in each list, in one scatter (ids outside
    the vocabulary dropped on the host: a boolean index on the device would wait for it)."""
    counts = torch.zeros(len(lists), vocab_size, device=device)
    lengths = np.fromiter((len(t) for t in lists), dtype=np.int64, count=len(lists))
    if lengths.sum() == 0:
        return counts
    ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in lists])
    row_of = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    keep = ids < vocab_size
    ids_d, rows_d = to_device(ids[keep], device), to_device(row_of[keep], device)
    return counts.index_put((rows_d, ids_d), torch.ones(len(ids_d), dtype=counts.dtype, device=device), accumulate=True)


def sample_random(logits: torch.Tensor, rows: RandomRows) -> torch.Tensor:
    """Temperature, min-p, top-k and top-p, then one draw per row by the exponential race."""
    probs = random_probs(logits, rows)
    noise = torch.empty_like(probs).exponential_()
    for row, generator in rows.generators.items():
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def random_probs(logits: torch.Tensor, rows: RandomRows) -> torch.Tensor:
    """Each row's distribution after temperature, min-p, top-k and top-p (fp32, [R, vocab])."""
    vocab_size = logits.shape[-1]
    logits = logits / rows.temperature[:, None]

    if rows.min_p is not None:
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < rows.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(too_unlikely, float("-inf"))

    # Which filters apply is decided on the host: testing a device tensor would wait for it.
    top_k_on = (rows.top_k_host > 0) & (rows.top_k_host < vocab_size)
    if (top_k_on | (rows.top_p_host < 1)).any():
        top_k = to_device(np.where(top_k_on, rows.top_k_host, vocab_size), logits.device)
        logits = apply_top_k_top_p(logits, top_k, rows.top_p)
    return logits.softmax(dim=-1)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the k largest and outside the smallest set of mass >= p.

    Ties at the k-th value are kept, and top-p always keeps the most likely token.
    """
    sorted_logits, order = logits.sort(dim=-1)  # ascending: the kept tokens are at the end
    kth_largest = sorted_logits.gather(1, (logits.shape[-1] - top_k)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside_top_p = cumulative <= 1 - top_p[:, None]
    outside_top_p[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(outside_top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
