"""The draft-model worker's drafting (gpu_worker/draft_service.py) on the CPU: its drafts are
the draft model's greedy continuation, whatever its cache already holds and however the
catch-up is chunked; a draft with another vocabulary is refused by name. The processes, the
scheduler's part and a killed draft worker: tests/e2e/test_speculative.py and
tests/scheduler/test_speculation.py."""

from __future__ import annotations

import json
import math

import pytest

from gpu_worker.draft_service import Drafter, DraftVocabularyError, _load
from protocol import DraftPlan, DraftRequest, DraftSetup, EngineConfig
from tests.model_check import make_runner, random_prompts, runner_greedy

K = 3


def test_drafts_are_the_greedy_continuation_across_plans_and_chunked_catch_ups(tiny, tokenizer) -> None:
    folder, _ = tiny("llama")
    prompts = random_prompts(len(tokenizer))  # 3, 17 and 40 tokens
    expected = runner_greedy(make_runner(str(folder)), prompts, max_tokens=12)
    # A budget of 16 tokens a step: the 17- and 40-token catch-ups take several steps.
    drafter = Drafter(make_runner(str(folder), max_num_batched_tokens=16))
    bs = drafter.runner.block_size
    tables = [list(range(10 * i, 10 * i + math.ceil((len(p) + 12) / bs))) for i, p in enumerate(prompts)]

    def plan(step: int, known: list[int], held: list[int], ks: list[int]) -> DraftPlan:
        return DraftPlan(step, [
            DraftRequest(f"r{i}", p + expected[i][: known[i]], held[i], tables[i], ks[i])
            for i, p in enumerate(prompts)
        ])

    # Round 1, the target's first token known, nothing in the draft's cache: the catch-up is
    # the prompt and that token; the drafts are the next tokens.
    ks = [K, 2, K]
    out = drafter.propose(plan(1, [1, 1, 1], [0, 0, 0], ks)).drafts
    for i in range(3):
        assert out[f"r{i}"] == expected[i][1: 1 + ks[i]]
    # Round 2 as the scheduler counts it: request 0 kept 2 drafts (+ the target's token), 1 kept
    # none, 2 kept all 3: the cache holds the known tokens up to the first rejected draft.
    kept = [2, 0, 3]
    known = [1 + k + 1 for k in kept]
    held = [len(p) + 1 + min(k, ks[i] - 1) for i, (p, k) in enumerate(zip(prompts, kept))]
    out = drafter.propose(plan(2, known, held, [K, K, 1])).drafts
    for i, k in enumerate([K, K, 1]):
        assert out[f"r{i}"] == expected[i][known[i]: known[i] + k], i
    assert not drafter.runner.input_batch.requests  # nothing kept between plans


def test_a_draft_with_another_vocabulary_is_refused_by_name(tiny, tokenizer) -> None:
    folder, _ = tiny("llama")
    spec = json.dumps({"method": "draft_model", "model": str(folder)})
    config = EngineConfig(device="cpu", dtype="float32", speculative_config=spec)
    said = rf"has a vocabulary of {len(tokenizer)} tokens, the target's has 49152"
    with pytest.raises(DraftVocabularyError, match=said):
        _load(config, 0, DraftSetup(num_blocks=32, max_model_len=256, vocab_size=49152))
