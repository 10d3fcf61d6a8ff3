"""Speculative decoding, the scheduler's part: which requests get draft tokens, and the counters.

With `--speculative-config '{"method": "ngram", ...}'` the scheduler proposes drafts itself: it
holds every request's tokens, so a prompt-lookup proposal is a numpy search on the host and
costs the GPU nothing (scheduler_svc/ngram.py). A request with drafts is scheduled
for 1 + k tokens, [its last token, d1 .. dk]; the worker scores all of them in one forward
and returns the drafts the target model keeps plus one token of its own (the rejection
sampler, gpu_worker/spec_decode/rejection_sampler.py). The scheduler then rolls its count of
computed tokens back over the rejected drafts: their K/V slots are simply written again.

Drafting needs the request's last token, so a request whose step with drafts is in flight is
not scheduled again until its result is back (async scheduling pauses for it). A request
whose plain step is in flight waits for it too when a draft could follow it (its last
prompt_lookup_min - 1 known tokens occur earlier), and is otherwise scheduled at once,
without drafts, keeping the overlap of steps where the text does not repeat itself.

Requests whose sampling reads more than the target's distribution at each position go
without drafts: logprobs and prompt logprobs, penalties, logit bias, a seed, structured
outputs, and min_tokens not reached yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocol.config import SpeculativeConfig
from scheduler_svc.ngram import propose_ngram
from scheduler_svc.request import Request


def can_speculate(req: Request) -> bool:
    """Whether the request's sampling allows drafts (see the module docstring)."""
    sp = req.sampling
    return (
        sp.logprobs is None
        and sp.prompt_logprobs is None
        and sp.presence_penalty == 0
        and sp.frequency_penalty == 0
        and sp.repetition_penalty == 1
        and not sp.logit_bias
        and sp.seed is None
        and sp.grammar is None
        and len(req.output_token_ids) >= sp.min_tokens
    )


def propose(spec: SpeculativeConfig, req: Request, max_drafts: int) -> list[int]:
    """Up to min(num_speculative_tokens, max_drafts) draft tokens for `req` (may be none)."""
    k = min(spec.num_speculative_tokens, max_drafts)
    if k <= 0:
        return []
    assert spec.prompt_lookup_min is not None and spec.prompt_lookup_max is not None
    tokens = np.asarray(req.all_token_ids, dtype=np.int64)
    return propose_ngram(tokens, spec.prompt_lookup_min, spec.prompt_lookup_max, k).tolist()


def may_draft_next(spec: SpeculativeConfig, req: Request) -> bool:
    """Whether the request could get drafts once its token in flight is known: an n-gram match
    of at least prompt_lookup_min tokens needs the last prompt_lookup_min - 1 known ones to occur
    earlier. If they do not, waiting for the token (and losing the overlap of its steps) would
    buy nothing."""
    assert spec.prompt_lookup_min is not None
    need = spec.prompt_lookup_min - 1
    if need == 0:
        return True
    tokens = np.asarray(req.all_token_ids, dtype=np.int64)
    return len(propose_ngram(tokens, need, need, 1)) > 0


@dataclass
class SpecCounters:
    """vLLM's spec_decode counters (totals since start)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft:
            self.accepted_per_pos.extend([0] * (num_draft - len(self.accepted_per_pos)))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1
