"""The rejection sampler: which of a step's draft tokens the target model keeps, and the token after them.

A row of a speculative step carries n <= k draft tokens x_0 .. x_{n-1} (n its `num_draft`),
and the target model has scored them all in one forward pass: target_probs[b, i] is its
distribution for the token at draft position i (already through temperature, top-k and
top-p), target_probs[b, n] the one for the token after the last draft (the bonus position).
Each row comes out with its run of kept drafts and exactly one more token, so a step always
advances a request by at least the one token plain decoding would have given.

Random rows use the speculative sampling of Leviathan et al. and Chen et al. (2023), as in
vLLM: draft x_i, proposed with probability q(x_i), is kept with probability
min(1, p(x_i) / q(x_i)); at the first rejection the row's last token is drawn from the
residual normalize(max(p - q, 0)) and the row stops. Whatever q is, the token at each
position is then distributed exactly as p: it is x through acceptance with probability
q(x) min(1, p(x) / q(x)) = min(p(x), q(x)), and through rejection with probability
(1 - sum min(p, q)) * residual(x) = p(x) - min(p(x), q(x)). An n-gram draft is a
deterministic proposal, q one-hot at the drafted token: it is kept with probability p(x_i),
and its residual is p with x_i taken out. A token with p = 0 is never output: it is never
kept (the test is u < p / q, strict, u in [0, 1)) and has no residual mass. Rows whose
drafts all pass draw the bonus token from p at position n.

Greedy rows keep their drafts while each equals the target's argmax and take the argmax at
the first mismatch (or at the bonus position): exactly the tokens greedy decoding would give.

All of it is batched tensor work with no device-to-host sync: one uniform per draft position
for every row at once, a cumulative product of the keep mask for each row's run of kept
drafts, and one exponential race (argmax of w / E, E ~ Exp(1): a draw from w / sum w without
normalizing w) per row over its residual or bonus distribution, gathered at the one position
where that row stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


class RejectionOutput(NamedTuple):
    token_ids: torch.Tensor  # [B, k + 1] int64: the kept drafts, then one more token, then -1
    num_accepted: torch.Tensor  # [B] int64: how many drafts were kept; the row emits num_accepted + 1 tokens


def rejection_sample(
    draft_token_ids: torch.Tensor,
    num_draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    greedy: torch.Tensor,
    generator: torch.Generator | None = None,
    row_generators: dict[int, torch.Generator] | None = None,
) -> RejectionOutput:
    """Verify each row's drafts against the target model's distributions.

    draft_token_ids: [B, k] int, row b's drafts in its first num_draft[b] columns; the rest
        is padding and may hold anything (-1 included). Draft ids must be < V.
    num_draft: [B] int in 0 .. k. A row with 0 drafts just samples one token from
        target_probs[b, 0].
    draft_probs: [B, k, V] fp32, the draft model's distribution at each position, the drafts
        having been drawn from it; None for deterministic proposals (n-gram), q one-hot.
    target_probs: [B, k + 1, V] fp32, the target's distributions after its sampling
        parameters; need not be normalized (only ratios and the race read them).
    greedy: [B] bool, the rows that take the argmax instead of drawing.
    generator: draws the batch's uniforms and noise (the default generator when None).
    row_generators: seeded rows, by row index: their uniforms and noise are drawn again
        from their own generator, so their tokens depend on nothing else in the batch.
    """
    batch, k = draft_token_ids.shape
    vocab_size = target_probs.shape[-1]
    if target_probs.shape != (batch, k + 1, vocab_size):
        raise ValueError(f"target_probs is {tuple(target_probs.shape)}, expected ({batch}, {k + 1}, V)")
    if draft_probs is not None and draft_probs.shape != (batch, k, vocab_size):
        raise ValueError(f"draft_probs is {tuple(draft_probs.shape)}, expected ({batch}, {k}, {vocab_size})")
    device = target_probs.device
    positions = torch.arange(k, device=device)
    num_draft = num_draft.to(device=device, dtype=torch.int64)
    is_draft = positions < num_draft[:, None]  # [B, k], False on the padding
    drafts = torch.where(is_draft, draft_token_ids.to(device=device, dtype=torch.int64), 0)  # gatherable padding
    greedy = greedy.to(device=device, dtype=torch.bool)
    target_argmax = target_probs.argmax(dim=-1)  # [B, k + 1]

    # Every random draw of the step, up front: one uniform per draft position (fp64, so the
    # keep probability is exact to far below any test's resolution) and one exponential per
    # vocabulary entry for the row's last token.
    uniform = torch.rand(batch, k, dtype=torch.float64, device=device, generator=generator)
    noise = torch.empty(batch, vocab_size, device=device).exponential_(generator=generator)
    for row, row_generator in (row_generators or {}).items():
        uniform[row] = torch.rand(k, dtype=torch.float64, device=device, generator=row_generator)
        noise[row].exponential_(generator=row_generator)

    # Which drafts pass, then each row's run of passing drafts from the start.
    p_draft = target_probs[:, :k].gather(2, drafts[..., None])[..., 0].double()
    if draft_probs is None:
        random_keep = uniform < p_draft
    else:
        # p / q: inf for q = 0 < p (kept), nan for p = q = 0 (not kept); exactly 1 for q == p.
        random_keep = uniform < p_draft / draft_probs.gather(2, drafts[..., None])[..., 0].double()
    keep = torch.where(greedy[:, None], drafts == target_argmax[:, :k], random_keep) & is_draft
    num_accepted = keep.long().cumprod(dim=1).sum(dim=1)

    # The one more token, at position num_accepted: from the residual where a draft was
    # rejected there, from p itself at the bonus position.
    rows = torch.arange(batch, device=device)
    p_last = target_probs[rows, num_accepted]  # [B, V]
    weights = p_last
    if k > 0:
        rejected = num_accepted < num_draft
        at = num_accepted.clamp(max=k - 1)
        if draft_probs is None:
            q_last = torch.zeros_like(p_last).scatter_(1, drafts[rows, at][:, None], 1.0)
        else:
            q_last = draft_probs[rows, at]
        residual = (p_last - q_last).clamp_(min=0)
        weights = torch.where(rejected[:, None], residual, p_last)
        # Rounding alone can leave no residual mass (p <= q everywhere in fp32, yet a draft
        # rejected): p is then the closest honest distribution to draw from.
        weights = torch.where((weights > 0).any(dim=1, keepdim=True), weights, p_last)
    sampled = torch.where(weights > 0, weights / noise, -1.0).argmax(dim=1)
    last = torch.where(greedy, target_argmax[rows, num_accepted], sampled)

    token_ids = torch.full((batch, k + 1), -1, dtype=torch.int64, device=device)
    token_ids[:, :k] = torch.where(positions < num_accepted[:, None], drafts, -1)
    token_ids.scatter_(1, num_accepted[:, None], last[:, None])
    return RejectionOutput(token_ids, num_accepted)


@dataclass(frozen=True)
class AcceptanceStats:
    """A step's speculative-decoding counts, the ones vLLM's spec-decode metrics add up."""

    num_drafts: int  # rows that carried at least one draft
    num_draft_tokens: int  # drafts proposed, padding excluded
    num_accepted_tokens: int  # drafts kept (the extra token of each row not counted)
    accepted_per_position: list[int]  # [i]: rows that kept at least i + 1 drafts


def acceptance_stats(
    num_draft: torch.Tensor | np.ndarray, num_accepted: torch.Tensor | np.ndarray, k: int
) -> AcceptanceStats:
    """The counts of one step from its rows' `num_draft` and `num_accepted` ([B] each).

    Reads both on the host (one copy each from the device): call it where the accepted
    counts come to the host anyway, to emit the tokens.
    """
    drafted, accepted = _host(num_draft), _host(num_accepted)
    per_position = (accepted[:, None] > np.arange(k)).sum(axis=0)
    return AcceptanceStats(
        num_drafts=int((drafted > 0).sum()),
        num_draft_tokens=int(drafted.sum()),
        num_accepted_tokens=int(accepted.sum()),
        accepted_per_position=[int(n) for n in per_position],
    )


def _host(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)
