"""What the scheduler refuses before queueing a request: what its tokenizer checks already,
checked again, since a request that was not checked must neither crash the worker (ids outside
the embedding, positions past the context) nor stall the queue."""

from __future__ import annotations

from protocol import EngineRequest
from scheduler_svc.scheduler import SchedulerConfig


def unrunnable(msg: EngineRequest, config: SchedulerConfig, vocab_size: int) -> str | None:
    """Why the worker could not run `msg`, or None."""
    prompt, max_tokens = msg.prompt_token_ids, msg.sampling.max_tokens
    if not prompt:
        return "the prompt is empty"
    if any(not 0 <= t < (vocab_size or 2**64) for ids in (prompt, *msg.output_token_ids) for t in ids):
        return f"token ids must be in [0, {vocab_size or 'the vocabulary size'})"
    if len(prompt) + max(1, max_tokens or 0) > config.max_model_len:
        return f"the prompt and max_tokens take more than the context of {config.max_model_len} tokens"
    # Each sample holds a KV block of its own when it runs: more than the pool has is no real
    # request, and an n of billions would stall this loop making them.
    if not 1 <= msg.sampling.n <= config.num_blocks:
        return f"n must be between 1 and {config.num_blocks}"
    # The worker keeps these in int64 columns.
    p = msg.sampling
    if any(not -(2**63) <= v < 2**63 for v in (p.top_k, p.min_tokens, p.logprobs or 0)):
        return "top_k, min_tokens and logprobs must fit in 64-bit signed integers"
    return None
