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

from gpu_worker.sampler import random_probs
from gpu_worker.sampling_metadata import RandomRows
from gpu_worker.spec_decode.rejection_sampler import rejection_sample
from gpu_worker.transfer import to_device
from protocol.messages import SamplingParams


def verify_drafts(
    logits: torch.Tensor, firsts: np.ndarray, drafts: list[np.ndarray], params: list[SamplingParams]
) -> list[list[int]]:
    """Each request's kept drafts and one more token.

    logits: the step's scored positions; request i's len(drafts[i]) + 1 of them are consecutive
    from row firsts[i]. drafts: each request's draft tokens; params: its sampling parameters.
    """
    num = np.array([len(d) for d in drafts], dtype=np.int64)
    k = int(num.max())
    # [B, k + 1, vocab], a shorter row padded by repeating its last position (never read).
    index = np.minimum(np.arange(k + 1)[None, :], num[:, None]) + firsts[:, None]
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
    """[B, k + 1, vocab] logits -> the sampler's distribution at each position (`random_probs`,
    each request's parameters repeated over its positions)."""
    b, positions, vocab = scores.shape

    def column(values: list[float], dtype: type = np.float32) -> np.ndarray:
        return np.repeat(np.array(values, dtype=dtype), positions)

    device = scores.device
    min_p = column([p.min_p for p in params])
    top_p = column([p.top_p for p in params])
    rows = RandomRows(
        index=torch.arange(b * positions, device=device),
        temperature=to_device(column([p.temperature for p in params]), device),
        min_p=to_device(min_p, device) if (min_p > 0).any() else None,
        top_p=to_device(top_p, device),
        top_k_host=column([p.top_k for p in params], np.int64),
        top_p_host=top_p,
    )
    return random_probs(scores.reshape(b * positions, vocab), rows).view(b, positions, vocab)
