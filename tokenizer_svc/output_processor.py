"""Token ids in, text out: the state a tokenizer keeps for each request it owns until it ends.

Each of a request's `n` samples (`TokenOutput.index`) has its own incremental detokenizer and
stop-string matcher; the request is forgotten once every sample has finished. A stop string
finishes its sample here, so the scheduler must be told (`Abort` with reason "stop").
"""

from __future__ import annotations

from typing import Any

from protocol import Abort, EngineRequest, Logprobs, SamplingParams, TextOutput, TokenOutput
from protocol.messages import PromptLogprobs
from tokenizer_svc.detokenizer import IncrementalDetokenizer
from tokenizer_svc.stop_strings import StopStringMatcher


class _Sample:
    """One of a request's `n` parallel samples."""

    __slots__ = ("detok", "stop", "output_token_ids", "finish_reason", "echoed")

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, sampling.skip_special_tokens)
        self.stop = StopStringMatcher(sampling.stop, sampling.include_stop_str_in_output) if sampling.stop else None
        # Every token received, so a restarted scheduler can continue the sample exactly.
        self.output_token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.echoed = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Request:
    __slots__ = ("prompt_token_ids", "sampling", "prompt_text", "arrival_time", "samples", "num_finished")

    def __init__(
        self, prompt_token_ids: list[int], sampling: SamplingParams, prompt_text: str | None, arrival_time: float
    ) -> None:
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.prompt_text = prompt_text
        self.arrival_time = arrival_time
        self.samples: dict[int, _Sample] = {}
        self.num_finished = 0


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids: set[int] = set()
        self.requests: dict[str, _Request] = {}
        self._token_text: dict[int, str] = {}  # each id decoded alone, for logprobs

    def __len__(self) -> int:
        return len(self.requests)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        prompt_text: str | None = None,
        arrival_time: float = 0.0,
    ) -> None:
        """Track a request; `prompt_text` (echo) goes out with each sample's first output."""
        self.requests[request_id] = _Request(prompt_token_ids, sampling, prompt_text, arrival_time)

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def resubmission(self, request_id: str, reply_to: str, scheduler_id: str) -> EngineRequest:
        """The request as a restarted scheduler must get it to continue each sample exactly
        where this tokenizer's text is: the prompt, every sample's outputs so far, which finished."""
        req = self.requests[request_id]
        samples = [req.samples.get(i) for i in range(req.sampling.n)]
        return EngineRequest(
            request_id,
            req.prompt_token_ids,
            req.sampling,
            reply_to,
            req.arrival_time,
            resume=True,
            output_token_ids=[list(s.output_token_ids) if s is not None else [] for s in samples],
            finished_samples={i: s.finish_reason for i, s in enumerate(samples) if s is not None and s.finished},
            scheduler_id=scheduler_id,
        )

    def process(self, outputs: list[TokenOutput]) -> tuple[list[TextOutput], list[Abort]]:
        """The text outputs for the frontend, and the aborts the scheduler must get (stop strings)."""
        texts: list[TextOutput] = []
        aborts: list[Abort] = []
        for out in outputs:
            req = self.requests.get(out.request_id)
            if req is None:
                continue  # aborted or finished here while its step ran
            sample = req.samples.get(out.index)
            if sample is None:
                sample = req.samples[out.index] = _Sample(self.tokenizer, req.prompt_token_ids, req.sampling)
            if sample.finished:
                continue  # stopped by a stop string; the scheduler had a step in flight
            text = self._process_one(out, req, sample)
            texts.append(text)
            if text.finish_reason is None:
                continue
            sample.finish_reason = text.finish_reason
            req.num_finished += 1
            if out.finish_reason is None:  # finished here, by a stop string: the scheduler goes on
                indices = [out.index] if req.sampling.n > 1 else None
                aborts.append(Abort([out.request_id], reason="stop", indices=indices))
            if req.num_finished >= req.sampling.n:
                del self.requests[out.request_id]
        return texts, aborts

    def _process_one(self, out: TokenOutput, req: _Request, sample: _Sample) -> TextOutput:
        sp = req.sampling
        ids = out.new_token_ids
        sample.output_token_ids += ids
        finish_reason, stop_reason = out.finish_reason, None
        text_ids = ids
        if finish_reason == "stop" and ids:
            # A token stop (EOS or stop_token_ids): vLLM names the token unless it is EOS,
            # and leaves it out of the text unless include_stop_str_in_output.
            stop_reason = None if ids[-1] in self.eos_token_ids else ids[-1]
            if not sp.include_stop_str_in_output:
                text_ids = ids[:-1]
        final = finish_reason is not None
        text = sample.detok.add(text_ids, final=final)
        if sample.stop is not None:
            # vLLM matches stop strings only once min_tokens are out.
            text, hit = sample.stop.feed(text, final=final, check=len(sample.output_token_ids) > sp.min_tokens)
            if hit is not None:
                finish_reason, stop_reason = "stop", hit
        prompt_text = None
        if req.prompt_text is not None and not sample.echoed:
            prompt_text, sample.echoed = req.prompt_text, True
        return TextOutput(
            out.request_id,
            text,
            list(ids),
            finish_reason,
            len(req.prompt_token_ids),
            len(sample.output_token_ids),
            out.index,
            self._with_token_texts(out.logprobs, ids),
            stop_reason,
            prompt_text,
            prompt_logprobs=self._with_prompt_texts(out.prompt_logprobs, req.prompt_token_ids),
        )

    def _with_token_texts(self, logprobs: Logprobs | None, token_ids: list[int]) -> Logprobs | None:
        if logprobs is None:
            return None
        logprobs.tokens = [self._text_of(t) for t in token_ids]
        logprobs.top_tokens = [[self._text_of(t) for t in ids] for ids in logprobs.top_token_ids]
        return logprobs

    def _with_prompt_texts(self, logprobs: PromptLogprobs | None, prompt_ids: list[int]) -> PromptLogprobs | None:
        """The prompt's tokens (each decoded alone, as logprobs name tokens) and the top ones'."""
        if logprobs is None:
            return None
        logprobs.prompt_token_ids = list(prompt_ids)
        logprobs.prompt_tokens = [self._text_of(t) for t in prompt_ids]
        logprobs.top_tokens = [[self._text_of(t) for t in ids] for ids in logprobs.top_token_ids]
        return logprobs

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            # Special tokens too: a logprob names the token whatever the text shows.
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

