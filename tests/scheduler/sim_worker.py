"""The worker's side of the scheduler contract at token level, for driving the Scheduler fast.

The KV cache holds token ids instead of vectors, so every "attention read" can be checked: a
request must find its own tokens at every position of its context through its block table.
That catches a wrong prefix hit, a missing copy-on-write, a block reused while still in use
and a token scheduled before it is known, in microseconds per step instead of a model's
milliseconds. `next_token` stands in for greedy decoding: the same context gives the same
token, so a preempted or prefix-cached request must end with the very tokens it gets alone.
tests/e2e/test_scheduler_with_runner.py drives the real model runner the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import StepPlan, StepResult

EOS = 0
VOCAB = 40


def next_token(tokens: list[int], seed: int | None) -> int:
    """A deterministic "model": the next token of a context (a tuple of ints hashes stably)."""
    return hash((tuple(tokens[-6:]), len(tokens), -1 if seed is None else seed)) % VOCAB


def reference_output(
    prompt: list[int], seed: int | None, max_tokens: int, max_model_len: int, ignore_eos: bool = False,
    model: Callable[[list[int], int | None], int] = next_token,
) -> list[int]:
    """What a request generates alone: until EOS, `max_tokens` or `max_model_len`."""
    tokens = list(prompt)
    out: list[int] = []
    while True:
        tok = model(tokens, seed)
        tokens.append(tok)
        out.append(tok)
        if (tok == EOS and not ignore_eos) or len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out


@dataclass
class SimRequest:
    token_ids: list[int]
    num_computed_tokens: int
    seed: int | None
    block_ids: list[int] = field(default_factory=list)


class SimWorker:
    """`model(tokens, seed)`: the next token (default `next_token`). Draft tokens in a plan are
    verified greedily against it: kept while each is the model's token, then the model's own."""

    def __init__(self, num_blocks: int, block_size: int, model: Callable[[list[int], int | None], int] | None = None):
        self.block_size = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.requests: dict[str, SimRequest] = {}
        self.model = model or next_token

    def _slot(self, req: SimRequest, pos: int) -> tuple[int, int]:
        return req.block_ids[pos // self.block_size], pos % self.block_size

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_request_ids:
            self.requests.pop(rid, None)
        for new in plan.new_requests:
            assert new.request_id not in self.requests, f"{new.request_id} sent as new while the worker holds it"
            self.requests[new.request_id] = SimRequest(
                list(new.prompt_token_ids), new.num_computed_tokens, new.sampling.seed, list(new.block_ids)
            )
        for cached in plan.cached_requests:
            req = self.requests[cached.request_id]
            assert cached.num_computed_tokens == req.num_computed_tokens, "scheduler and worker disagree"
            req.block_ids.extend(cached.new_block_ids)
        for src, dst in plan.block_copies:
            self.kv[dst] = list(self.kv[src])
        for rid, drafts in plan.spec_token_ids.items():
            req = self.requests[rid]
            assert plan.num_scheduled_tokens[rid] == 1 + len(drafts)
            assert req.num_computed_tokens == len(req.token_ids) - 1, "drafts follow the last known token"
            req.token_ids.extend(drafts)

        scheduled = [(self.requests[rid], n) for rid, n in plan.num_scheduled_tokens.items()]
        # As in each model layer: every token's K/V is written, then every token reads.
        for req, n in scheduled:
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            assert 1 <= n and end <= len(req.token_ids), f"tokens {start}..{end} of {len(req.token_ids)} scheduled"
            assert len(req.block_ids) * self.block_size >= end, "too few blocks for the scheduled tokens"
            for pos in range(start, end):
                self._write(req, pos)
        request_ids, token_ids = [], []
        for rid, n in plan.num_scheduled_tokens.items():
            req = self.requests[rid]
            req.num_computed_tokens += n
            for pos in range(req.num_computed_tokens):
                b, off = self._slot(req, pos)
                assert self.kv[b][off] == req.token_ids[pos], f"{rid} reads a wrong token at {pos} (block {b})"
            if req.num_computed_tokens == len(req.token_ids):
                drafts = plan.spec_token_ids.get(rid, [])
                known = len(req.token_ids) - len(drafts)
                out = []
                for i in range(len(drafts) + 1):
                    out.append(self.model(req.token_ids[: known + i], req.seed))
                    if i == len(drafts) or out[-1] != drafts[i]:
                        break
                req.token_ids[known:] = out
                req.num_computed_tokens = known + len(out) - 1  # the rejected drafts' K/V is stale
                request_ids += [rid] * len(out)
                token_ids += out
        return StepResult(plan.step_id, request_ids, token_ids)

    def _write(self, req: SimRequest, pos: int) -> None:
        """Write one token's K/V; it must not change what another live request already computed."""
        b, off = self._slot(req, pos)
        value = req.token_ids[pos]
        for other in self.requests.values():
            if other is req or b not in other.block_ids:
                continue
            other_pos = other.block_ids.index(b) * self.block_size + off
            if other_pos < other.num_computed_tokens:
                assert other.token_ids[other_pos] == value, f"block {b} overwritten under another request"
        self.kv[b][off] = value
