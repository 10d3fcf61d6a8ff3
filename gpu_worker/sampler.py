"""Choosing the next token of every sampling row, each with its own parameters.

Greedy rows take the exact argmax of the logits. The others go through temperature, min-p,
top-k and top-p, then draw with the exponential race (argmax of p / E, E ~ Exp(1)), which
samples from p without a device-to-host sync. A seeded request draws its noise from its own
`torch.Generator`, so its tokens depend only on its seed and its logits, never on the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from protocol.messages import SamplingParams


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] fp32: log p(chosen token) under the model's own logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> SamplerOutput:
    """One token per row of `logits` [N, vocab] (fp32), row i sampled with `params[i]`.

    Logprobs are returned when any row asks for them; they are taken before temperature and
    filtering, i.e. what the model itself gives the chosen token.
    """
    token_ids = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        token_ids[rows] = _sample_random(
            logits[rows], [params[i] for i in random_rows], [generators[i] for i in random_rows]
        )
    logprobs = None
    if any(p.logprobs is not None for p in params):
        logprobs = logits.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]
    return SamplerOutput(token_ids, logprobs)


def _sample_random(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    device, vocab_size = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    logits = logits / temperature[:, None]

    min_p = torch.tensor([p.min_p for p in params], device=device)
    if (min_p > 0).any():
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(too_unlikely, float("-inf"))

    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if (top_k < vocab_size).any() or (top_p < 1).any():
        logits = _apply_top_k_top_p(logits, top_k, top_p)

    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
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
