"""Choosing the next token of every sampling row, each with its own parameters.

The logits go through, in vLLM's order: logit bias and the min_tokens mask (EOS and
`stop_token_ids` banned until enough tokens are out), then the repetition, frequency and
presence penalties. Greedy rows take the exact argmax of what is left. The others go through
temperature, min-p, top-k and top-p, then draw with the exponential race (argmax of p / E,
E ~ Exp(1)), which samples from p without a device-to-host sync.

A seeded request draws its noise from a generator seeded with (seed, output position), so
its tokens depend only on its seed and its logits: never on the batch around it, and not on
a preemption either (the resumed request draws the same noise at the same position).

Logprobs are those of the model's raw logits (vLLM's default), before any of the above.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from gpu_worker.transfer import to_device
from protocol.messages import SamplingParams

# The most alternatives a request may ask logprobs for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive positions over the seed space


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] fp32: log p(chosen token) under the model's own logits
    top_logprob_ids: torch.Tensor | None  # [N, k] the k most likely tokens, best first
    top_logprobs: torch.Tensor | None  # [N, k]


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    token_ids: Sequence[Sequence[int]] | None = None,
    num_prompt_tokens: Sequence[int] | None = None,
    eos_token_ids: Sequence[int] = (),
    num_outputs: Sequence[int] | None = None,
) -> SamplerOutput:
    """One token per row of `logits` [N, vocab], row i sampled with `params[i]`.

    The logits may come in the model's dtype: a batch whose rows all take the plain argmax
    (greedy, no logprobs, bias, min_tokens or penalties) reads them as they are, since the
    argmax of bf16 values is the argmax of their exact fp32 copies; anything else is computed
    in fp32.

    `token_ids[i]` is row i's prompt and outputs so far (a list or a 1-d integer array) and
    `num_prompt_tokens[i]` how many of those are prompt: the penalties need them.
    `num_outputs[i]` (default: from token_ids, else 0) is how many outputs row i has, which
    min_tokens and seeds count. `generators[i]`, if given, is reused for row i's seeded draws.
    """
    n, vocab_size = logits.shape
    if num_outputs is None:
        if token_ids is None:
            num_outputs = [0] * n
        else:
            assert num_prompt_tokens is not None, "token_ids come with num_prompt_tokens"
            num_outputs = [len(t) - p for t, p in zip(token_ids, num_prompt_tokens, strict=True)]
    if logits.dtype != torch.float32:
        if all(_plain_argmax(p) for p in params):
            return SamplerOutput(logits.argmax(dim=-1), None, None, None)
        logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1) if any(p.logprobs is not None for p in params) else None

    logits = _apply_logit_bias(logits, params)
    logits = _apply_min_tokens(logits, params, num_outputs, eos_token_ids)
    if token_ids is not None and num_prompt_tokens is not None:
        logits = _apply_penalties(logits, params, token_ids, num_prompt_tokens)

    chosen = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = to_device(random_rows, logits.device)
        seeded = {
            j: _position_generator(params[i].seed, num_outputs[i], generators[i], logits.device)
            for j, i in enumerate(random_rows)
            if params[i].seed is not None
        }
        chosen[rows] = _sample_random(logits[rows], [params[i] for i in random_rows], seeded)

    if raw_logprobs is None:
        return SamplerOutput(chosen, None, None, None)
    k = min(max(p.logprobs or 0 for p in params), MAX_LOGPROBS, vocab_size)
    top = raw_logprobs.topk(k, dim=-1)
    return SamplerOutput(chosen, raw_logprobs.gather(1, chosen[:, None])[:, 0], top.indices, top.values)


def _plain_argmax(p: SamplingParams) -> bool:
    return p.greedy and p.logprobs is None and not p.logit_bias and p.min_tokens == 0 and not p.needs_history


def _position_generator(
    seed: int, position: int, generator: torch.Generator | None, device: torch.device
) -> torch.Generator:
    generator = generator if generator is not None else torch.Generator(device=device)
    return generator.manual_seed((seed + position * _GOLDEN) % 2**64)


def _apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if t < logits.shape[1]]
    if not entries:
        return logits
    rows, cols, bias = zip(*entries)
    index = (to_device(rows, logits.device), to_device(cols, logits.device))
    return logits.index_put(index, to_device(bias, logits.device, logits.dtype), accumulate=True)


def _apply_min_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], num_outputs: Sequence[int], eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """Ban EOS and the stop tokens of every row with fewer than `min_tokens` outputs so far."""
    banned = [
        (i, t)
        for i, p in enumerate(params)
        if num_outputs[i] < p.min_tokens
        for t in chain(eos_token_ids, p.stop_token_ids)
        if t < logits.shape[1]
    ]
    if not banned:
        return logits
    rows, cols = zip(*banned)
    index = (to_device(rows, logits.device), to_device(cols, logits.device))
    return logits.index_put(index, torch.full((), float("-inf"), device=logits.device))


def _apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    token_ids: Sequence[Sequence[int]],
    num_prompt_tokens: Sequence[int],
) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output tokens, frequency and presence over outputs."""
    rows = [i for i, p in enumerate(params) if p.needs_history]
    if not rows:
        return logits
    device, vocab_size = logits.device, logits.shape[1]
    sub = [params[i] for i in rows]
    outputs = [token_ids[i][num_prompt_tokens[i] :] for i in rows]
    output_counts = _bincount_rows(outputs, vocab_size, device)
    output_mask = output_counts > 0
    row_index = to_device(rows, device)
    penalized = logits[row_index]
    if any(p.repetition_penalty != 1.0 for p in sub):
        repetition = to_device([p.repetition_penalty for p in sub], device)
        prompts = [token_ids[i][: num_prompt_tokens[i]] for i in rows]
        seen = (_bincount_rows(prompts, vocab_size, device) > 0) | output_mask
        factor = torch.where(seen, repetition[:, None], 1.0)
        penalized = torch.where(penalized > 0, penalized / factor, penalized * factor)
    frequency = to_device([p.frequency_penalty for p in sub], device)
    presence = to_device([p.presence_penalty for p in sub], device)
    penalized = penalized - frequency[:, None] * output_counts - presence[:, None] * output_mask
    logits = logits.clone()
    logits[row_index] = penalized
    return logits


def _bincount_rows(lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
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


def _sample_random(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeded: dict[int, torch.Generator],
) -> torch.Tensor:
    device, vocab_size = logits.device, logits.shape[-1]
    # Which steps apply is decided from the parameters on the host: a test of a device
    # tensor (`(min_p > 0).any()`) would wait for the device.
    temperature = to_device([p.temperature for p in params], device)
    logits = logits / temperature[:, None]

    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], device)
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(too_unlikely, float("-inf"))

    if any(0 < p.top_k < vocab_size or p.top_p < 1 for p in params):
        top_k = to_device([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params], device)
        top_p = to_device([p.top_p for p in params], device)
        logits = _apply_top_k_top_p(logits, top_k, top_p)

    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, generator in seeded.items():
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
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
