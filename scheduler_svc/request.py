"""A request as the scheduler sees it: its tokens, its block table, its state."""

from __future__ import annotations

import enum

import msgspec

from protocol import SamplingParams
from protocol.messages import PromptLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        reply_to: str,
        max_tokens: int,
        arrival_time: float = 0.0,
        parent_id: str | None = None,
        index: int = 0,
    ) -> None:
        self.request_id = request_id
        # Outputs go to the tokenizer under the parent's id and this sample's index (n > 1).
        self.parent_id = parent_id or request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.reply_to = reply_to
        self.max_tokens = max_tokens
        self.arrival_time = arrival_time
        self.output_token_ids: list[int] = []
        self.block_ids: list[int] = []
        # Tokens whose K/V is in the cache (or scheduled to be, in the step in flight).
        self.num_computed_tokens = 0
        # Tokens sampled by steps in flight and not returned yet (async scheduling): the worker
        # knows them, so they can be scheduled before the scheduler has seen them.
        self.num_output_placeholders = 0
        # Tokens still to come from steps planned before this request was preempted: the
        # worker's copy of the request that sampled them is gone, so they are dropped.
        self.num_stale_tokens = 0
        # Speculative decoding: drafts scheduled in the step in flight (then no other step of
        # this request is), the last step planned for it, and results to drop after a
        # preemption (steps up to this id; a step with drafts returns 1 to k + 1 rows).
        self.num_drafts_in_flight = 0
        self.last_step_id = -1
        self.drop_results_through = -1
        # Draft-model speculation: how many of its tokens the draft worker's cache holds (the
        # draft computes the rest before proposing; 0 after a preemption or a draft restart).
        self.num_draft_computed = 0
        # Prefix cache: the hash of every full block of the known tokens, how many of this
        # request's blocks were offered to the cache, and how many tokens its last admission
        # found cached.
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        # True until the worker has been sent this request since it was last (re)admitted.
        self.is_new_to_worker = True
        self.num_preemptions = 0
        # With `sampling.prompt_logprobs`: the prompt's, joined chunk by chunk, until they go out
        # with the first output (kept across a preemption: a recomputed chunk adds nothing).
        self.prompt_logprobs: PromptLogprobs | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def split_samples(self) -> list[Request]:
        """One request per parallel sample of `sampling.n`, or [self] when n is 1.

        Sample i is `<id>#<i>`, samples n = 1 itself, and with a seed uses seed + i, so each
        sample is reproducible on its own and the n samples differ.
        """
        n = self.sampling.n
        if n <= 1:
            return [self]
        samples = []
        for i in range(n):
            seed = None if self.sampling.seed is None else self.sampling.seed + i
            # The prompt's logprobs are the request's: sample 0, which computes the prompt, sends them.
            prompt_logprobs = self.sampling.prompt_logprobs if i == 0 else None
            sampling = msgspec.structs.replace(self.sampling, n=1, seed=seed, prompt_logprobs=prompt_logprobs)
            samples.append(
                Request(
                    f"{self.request_id}#{i}", self.prompt_token_ids, sampling, self.reply_to,
                    self.max_tokens, self.arrival_time, parent_id=self.request_id, index=i,
                )
            )
        return samples

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
