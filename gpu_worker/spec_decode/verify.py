"""Verifying a step's draft tokens: the target's distribution at every draft position, then the
rejection sampler.

A request with k drafts was scored at k + 1 positions (its last token and each draft). Its
sampling parameters make the target's distribution at each of them: greedy requests take the
argmax of the raw logits (exactly plain decoding's token), the others go through temperature,
min-p, top-k and top-p as the sampler does, then softmax. Requests with parameters that read
more than that distribution (penalties, logit bias, logprobs, seeds, structured outputs, an
unmet min_tokens) are never given drafts (scheduler_svc/speculation.py).
"""

from __future__ import annotations

import numpy as np
import torch

from gpu_worker.sampler import apply_top_k_top_p
from gpu_worker.spec_decode.rejection_sampler import rejection_sample
from gpu_worker.transfer import to_device
from protocol.messages import SamplingParams


def verify_drafts(
    logits: torch.Tensor, drafts: list[np.ndarray], params: list[SamplingParams]
) -> list[list[int]]:
    """Each request's kept drafts and one more token.

    logits: [sum(len(d) + 1), vocab], request by request, position by position.
    drafts: each request's draft tokens; params: its sampling parameters.
    """
    num = np.array([len(d) for d in drafts], dtype=np.int64)
    k = int(num.max())
    # [B, k + 1, vocab], a shorter row padded by repeating its last position (never read).
    index = np.minimum(np.arange(k + 1)[None, :], num[:, None]) + (np.cumsum(num + 1) - num - 1)[:, None]
    scores = logits[to_device(index.reshape(-1), logits.device)].view(len(num), k + 1, -1).float()
    draft_ids = np.zeros((len(num), k), dtype=np.int64)
    for i, d in enumerate(drafts):
        draft_ids[i, : len(d)] = d
    greedy = np.array([p.temperature == 0 for p in params])
    out = torch.empty(len(num), k + 1, dtype=torch.int64, device=logits.device)
    accepted = torch.empty(len(num), dtype=torch.int64, device=logits.device)
    for rows, is_greedy in ((np.flatnonzero(greedy), True), (np.flatnonzero(~greedy), False)):
        if len(rows) == 0:
            continue
        rows_d = to_device(rows, logits.device)
        target = scores[rows_d] if is_greedy else _probs(scores[rows_d], [params[i] for i in rows])
        result = rejection_sample(
            to_device(draft_ids[rows], logits.device),
            to_device(num[rows], logits.device),
            None,  # n-gram drafts: deterministic proposals
            target,
            torch.full((len(rows),), is_greedy, device=logits.device),
        )
        out[rows_d], accepted[rows_d] = result.token_ids, result.num_accepted
    tokens, kept = out.tolist(), accepted.tolist()
    return [row[: n + 1] for row, n in zip(tokens, kept, strict=True)]


def _probs(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[B, k + 1, vocab] logits -> the sampler's distribution at each position (fp32)."""
    b, positions, vocab = scores.shape
    device = scores.device
    temperature = to_device(np.array([p.temperature for p in params], dtype=np.float32), device)
    flat = (scores / temperature[:, None, None]).reshape(b * positions, vocab)
    min_p = np.array([p.min_p for p in params], dtype=np.float32)
    if (min_p > 0).any():
        probs = flat.softmax(dim=-1)
        floor = to_device(np.repeat(min_p, positions), device)[:, None] * probs.amax(dim=-1, keepdim=True)
        flat = flat.masked_fill(probs < floor, float("-inf"))
    top_k = np.array([p.top_k if 0 < p.top_k < vocab else vocab for p in params], dtype=np.int64)
    top_p = np.array([p.top_p for p in params], dtype=np.float32)
    if (top_k < vocab).any() or (top_p < 1).any():
        flat = apply_top_k_top_p(
            flat, to_device(np.repeat(top_k, positions), device), to_device(np.repeat(top_p, positions), device)
        )
    return flat.softmax(dim=-1).view(b, positions, vocab)
