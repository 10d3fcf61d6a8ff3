"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, SamplingParams(...))`.

It runs the very same processes as `pagoda serve` (tokenizers, scheduler, workers) and talks
to them through the frontend's `EngineClient`, on an event loop in a background thread; only
the HTTP server is left out.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from frontend.engine_client import EngineClient
from frontend.openai_responses import prompt_logprob_dicts
from frontend.processes import GaveUp, ProcessGroup
from protocol import ChatMessage, EngineConfig, SamplingParams, SchedulerStats, TextOutput, TokenizeRequest


@dataclass
class Logprob:
    """vLLM's: a token's logprob, its rank among the top alternatives (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None  # None: the sampled token was not among the top alternatives asked for
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None  # with `logprobs`: the sum over token_ids
    # With `logprobs`: one dict per token, the sampled token and the top alternatives by id.
    logprobs: list[dict[int, Logprob]] | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    outputs: list[CompletionOutput]
    num_prompt_tokens: int = 0
    finished: bool = True
    metrics: dict[str, float] = field(default_factory=dict)
    # With `prompt_logprobs` (vLLM's shape): None for the first prompt token, then for each one a
    # dict by token id: its own Logprob (rank in the vocabulary) and the k most likely.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


Prompt = str | list[int]

logger = logging.getLogger("pagoda.llm")


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        engine_args.setdefault("num_tokenizers", 1)
        if isinstance(engine_args.get("speculative_config"), dict):  # vLLM's form: a dict
            engine_args["speculative_config"] = json.dumps(engine_args["speculative_config"])
        self.config = EngineConfig(model=model, **engine_args).with_addresses()
        self.config.speculative  # noqa: B018 (a bad speculative_config fails here, not in the scheduler)
        self._group = ProcessGroup(self.config, with_frontend=False)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pagoda-llm", daemon=True)
        self._thread.start()
        self._client = EngineClient(self.config)
        self._closed = False
        self._monitor_stop = threading.Event()
        self._monitor: threading.Thread | None = None
        try:
            self._call(self._client.start())
            self._group.start()
            self._group.wait_until(lambda: self._client.ready, timeout_s=900)
        except BaseException:
            self.shutdown()
            raise
        # Members that die from now on are restarted, as under `pagoda serve`.
        self._group.restarts_enabled = True
        self._monitor = threading.Thread(target=self._supervise, name="pagoda-llm-supervisor", daemon=True)
        self._monitor.start()
        atexit.register(self.shutdown)

    def _supervise(self) -> None:
        while not self._monitor_stop.wait(0.1):
            try:
                self._group.supervise()
            except GaveUp as e:
                logger.error("%s", e)
                self._group.stop()
                return

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _run_one(self, req: TokenizeRequest, prompt: str | None, bar: tqdm | None) -> RequestOutput:
        start = time.perf_counter()
        first: float | None = None
        samples = [_Sample(i, req.sampling.logprobs is not None) for i in range(req.sampling.n)]
        num_prompt_tokens = 0
        prompt_logprobs = None
        async for out in self._client.generate(req):
            if first is None:
                first = time.perf_counter()
            samples[out.index].add(out)
            num_prompt_tokens = out.prompt_tokens
            if out.prompt_logprobs is not None:
                prompt_logprobs = prompt_logprob_dicts(out.prompt_logprobs, Logprob)
        end = time.perf_counter()
        if bar is not None:
            bar.update(1)
        num_tokens = sum(len(s.token_ids) for s in samples)
        metrics = {"e2e_s": end - start}
        if first is not None:
            metrics["time_to_first_token_s"] = first - start
            if num_tokens > len(samples):
                metrics["decode_tokens_per_s"] = (num_tokens - len(samples)) / max(end - first, 1e-9)
        return RequestOutput(
            req.request_id, prompt, [s.output() for s in samples], num_prompt_tokens, metrics=metrics,
            prompt_logprobs=prompt_logprobs,
        )

    def _run(self, reqs: list[tuple[TokenizeRequest, str | None]], use_tqdm: bool) -> list[RequestOutput]:
        async def run_all() -> list[RequestOutput]:
            bar = tqdm(total=len(reqs), desc="Processed prompts", disable=not use_tqdm)
            try:
                return list(await asyncio.gather(*(self._run_one(r, p, bar) for r, p in reqs)))
            finally:
                bar.close()

        return self._call(run_all())

    @staticmethod
    def _params_for(sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} sampling params for {n} prompts")
        return list(sampling_params)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids); outputs in the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = self._params_for(sampling_params, len(prompts))
        reqs = []
        for prompt, sp in zip(prompts, params):
            rid = f"offline-{uuid.uuid4().hex}"
            if isinstance(prompt, str):
                reqs.append((TokenizeRequest(rid, sp, prompt=prompt), prompt))
            else:
                reqs.append((TokenizeRequest(rid, sp, prompt_token_ids=list(prompt)), None))
        return self._run(reqs, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, str]] | Sequence[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self._params_for(sampling_params, len(conversations))
        reqs = []
        for conv, sp in zip(conversations, params):
            msgs = [ChatMessage(m["role"], m.get("content")) for m in conv]  # type: ignore[index]
            rid = f"offline-chat-{uuid.uuid4().hex}"
            treq = TokenizeRequest(
                rid,
                sp,
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
            reqs.append((treq, None))
        return self._run(reqs, use_tqdm)

    @property
    def scheduler_stats(self) -> SchedulerStats:
        """The scheduler's latest figures (running, waiting, KV usage, prefix cache, preemptions)."""
        return self._client.scheduler_stats

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # No restarts while the members stop on purpose.
        self._monitor_stop.set()
        if self._monitor is not None:
            self._monitor.join()
        try:
            if self._loop.is_running():
                self._call(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._group.stop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _Sample:
    """One of a request's `n` samples, gathered output by output."""

    def __init__(self, index: int, with_logprobs: bool) -> None:
        self.index = index
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if with_logprobs else None

    def add(self, out: TextOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        if self.logprobs is not None and out.logprobs is not None:
            lp = out.logprobs
            for i, token_id in enumerate(out.token_ids):
                alternatives = zip(lp.top_token_ids[i], lp.top_logprobs[i], lp.top_tokens[i])
                top = {t: Logprob(v, rank, text) for rank, (t, v, text) in enumerate(alternatives, 1)}
                chosen = top.get(token_id) or Logprob(lp.token_logprobs[i], None, lp.tokens[i])
                self.logprobs.append({token_id: chosen, **top})

    def output(self) -> CompletionOutput:
        cumulative = None
        if self.logprobs is not None:
            cumulative = sum(step[t].logprob for step, t in zip(self.logprobs, self.token_ids))
        return CompletionOutput(
            self.index,
            "".join(self.text),
            self.token_ids,
            self.finish_reason,
            cumulative,
            self.logprobs,
            self.stop_reason,
        )
