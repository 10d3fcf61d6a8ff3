"""Prompt logprobs in the model runner (gpu_worker/prompt_logprobs.py), driven by hand-built
StepPlans on a tiny Llama in fp32 on the CPU, against transformers' log_softmax of its logits."""

from __future__ import annotations

import math
import random

import msgspec
import pytest
import torch

from gpu_worker import prompt_logprobs as module
from gpu_worker.model_runner import ModelRunner
from protocol.messages import CachedRequestData, NewRequestData, PromptLogprobs, SamplingParams, StepPlan
from tests.model_check import make_runner
from tests.tiny_models import REAL_INIT

K = 4
ASKING = SamplingParams(temperature=0.0, ignore_eos=True, prompt_logprobs=K)
PLAIN = SamplingParams(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny):
    folder, hf_model = tiny("llama", REAL_INIT)  # trained-scale weights: logprobs near -log(vocab)
    return make_runner(str(folder), max_model_len=256), hf_model


@torch.inference_mode()
def reference(hf_model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: transformers' fp32 log_softmax at each position but the last."""
    return hf_model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


def check_against(expected: torch.Tensor, prompt: list[int], got: PromptLogprobs, k: int = K) -> None:
    assert got.first == 1 and len(got.token_logprobs) == len(prompt) - 1
    targets = torch.tensor(prompt[1:])
    want = expected.gather(1, targets[:, None])[:, 0]
    ours = torch.tensor(got.token_logprobs)
    assert ((ours - want).abs() / want.abs()).max().item() < 1e-4
    assert got.token_ranks == (expected >= want[:, None]).sum(-1).tolist()
    top = expected.topk(k)
    assert got.top_token_ids == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(got.top_logprobs), top.values, rtol=1e-4, atol=0)


class Blocks:
    def __init__(self, runner: ModelRunner) -> None:
        self.free = list(range(runner.num_blocks))
        random.Random(0).shuffle(self.free)
        self.block_size = runner.block_size
        self.held: dict[str, int] = {}

    def upto(self, rid: str, num_tokens: int) -> list[int]:
        need = math.ceil(num_tokens / self.block_size) - self.held.get(rid, 0)
        self.held[rid] = self.held.get(rid, 0) + need
        return [self.free.pop() for _ in range(need)]


def test_one_step_prompt_matches_transformers(model) -> None:
    runner, hf_model = model
    prompt = random.Random(1).sample(range(2, 320), 21)
    blocks = Blocks(runner)
    plan = StepPlan(1, [NewRequestData("a", prompt, ASKING, blocks.upto("a", 21), 0)], [], {"a": 21}, [])
    result = runner.execute(plan)
    assert result.request_ids == ["a"]  # the last position still samples
    check_against(reference(hf_model, prompt), prompt, result.prompt_logprobs["a"])
    # Through the wire and back, as the scheduler gets it.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(result), type=type(result))
    assert wire.prompt_logprobs == result.prompt_logprobs
    runner.execute(StepPlan(2, [], [], {}, ["a"]))


def run_chunks_beside_a_decode(runner: ModelRunner, prompt: list[int], other: list[int]) -> list[PromptLogprobs]:
    """`prompt` in chunks of 7 (k = 2) while `other` decodes in the same steps; each step's chunk."""
    blocks = Blocks(runner)
    new = [NewRequestData("b", other, PLAIN, blocks.upto("b", len(other)), 0),
           NewRequestData("a", prompt, msgspec.structs.replace(ASKING, prompt_logprobs=2), blocks.upto("a", 7), 0)]
    result = runner.execute(StepPlan(1, new, [], {"b": len(other), "a": 7}, []))
    assert set(result.prompt_logprobs) == {"a"}
    chunks = [result.prompt_logprobs["a"]]
    done, step, num_b = 7, 2, len(other) + 1
    while done < len(prompt):
        n = min(7, len(prompt) - done)
        cached = [CachedRequestData("b", blocks.upto("b", num_b), num_b - 1),
                  CachedRequestData("a", blocks.upto("a", done + n), done)]
        result = runner.execute(StepPlan(step, [], cached, {"a": n, "b": 1}, []))
        assert set(result.prompt_logprobs) == {"a"}
        chunks.append(result.prompt_logprobs["a"])
        done, step, num_b = done + n, step + 1, num_b + 1
    assert runner.prompt_logprobs.wanted == {}  # done with "a"
    runner.execute(StepPlan(step, [], [], {}, ["a", "b"]))
    return chunks


def joined(chunks: list[PromptLogprobs]) -> PromptLogprobs:
    fields = ("token_logprobs", "token_ranks", "top_token_ids", "top_logprobs")
    return PromptLogprobs(1, *([x for c in chunks for x in getattr(c, f)] for f in fields))


def test_chunks_beside_a_decode_cover_every_position_once(model) -> None:
    """A prompt in chunks while another request decodes in the same steps (decodes go first in
    the batch): each chunk returns its positions, the last one of a chunk predicting the next
    chunk's first token; the other request gets none."""
    runner, hf_model = model
    rng = random.Random(2)
    prompt, other = [rng.randrange(2, 320) for _ in range(30)], [rng.randrange(2, 320) for _ in range(5)]
    chunks = run_chunks_beside_a_decode(runner, prompt, other)
    assert [c.first for c in chunks] == [1, 8, 15, 22, 29]
    assert [len(c.token_logprobs) for c in chunks] == [7, 7, 7, 7, 1]
    check_against(reference(hf_model, prompt), prompt, joined(chunks), k=2)


def test_only_the_last_token_left_sends_nothing(model) -> None:
    """A chunk holding only the last prompt position has no prompt token to predict."""
    runner, _ = model
    prompt = list(range(40, 57))
    blocks = Blocks(runner)
    new = NewRequestData("a", prompt, ASKING, blocks.upto("a", 16), 0)
    first = runner.execute(StepPlan(1, [new], [], {"a": 16}, []))
    assert len(first.prompt_logprobs["a"].token_logprobs) == 16  # tokens 1..16, the last one included
    last = runner.execute(StepPlan(2, [], [CachedRequestData("a", blocks.upto("a", 17), 16)], {"a": 1}, []))
    assert last.request_ids == ["a"] and last.prompt_logprobs is None
    runner.execute(StepPlan(3, [], [], {}, ["a"]))


def test_none_for_resumed_requests_plain_ones_and_one_token_prompts(model) -> None:
    runner, _ = model
    blocks = Blocks(runner)
    resumed = NewRequestData("r", list(range(10, 30)), ASKING, blocks.upto("r", 20), 0, num_output_tokens=3)
    plain = NewRequestData("p", list(range(10, 30)), PLAIN, blocks.upto("p", 20), 0)
    single = NewRequestData("s", [42], ASKING, blocks.upto("s", 1), 0)
    result = runner.execute(StepPlan(1, [resumed, plain, single], [], {"r": 20, "p": 20, "s": 1}, []))
    assert sorted(result.request_ids) == ["p", "r", "s"]
    assert result.prompt_logprobs is None
    assert runner.prompt_logprobs.wanted == {}
    runner.execute(StepPlan(2, [], [], {}, ["r", "p", "s"]))


def test_a_preempted_request_sent_again_recomputes_from_its_data(model) -> None:
    """Preempted in the middle of its prompt, then sent as new again: it starts over."""
    runner, hf_model = model
    prompt = list(range(100, 124))
    blocks = Blocks(runner)
    runner.execute(StepPlan(1, [NewRequestData("a", prompt, ASKING, blocks.upto("a", 8), 0)], [], {"a": 8}, []))
    again = Blocks(runner)
    again.free = again.free[::-1]
    result = runner.execute(StepPlan(2, [NewRequestData("a", prompt, ASKING, again.upto("a", 24), 0)], [],
                                     {"a": 24}, ["a"]))
    check_against(reference(hf_model, prompt), prompt, result.prompt_logprobs["a"])
    runner.execute(StepPlan(3, [], [], {}, ["a"]))


def test_small_slices_give_the_same_numbers(model, monkeypatch) -> None:
    """The LM head runs over slices of the positions when [chunk, vocab] would be too large."""
    runner, hf_model = model
    prompt = random.Random(3).sample(range(2, 320), 25)
    monkeypatch.setattr(module, "MAX_LOGITS_ELEMENTS", 3 * runner.model.config.vocab_size)  # 3 positions a slice
    blocks = Blocks(runner)
    result = runner.execute(StepPlan(1, [NewRequestData("a", prompt, ASKING, blocks.upto("a", 25), 0)], [],
                                     {"a": 25}, []))
    check_against(reference(hf_model, prompt), prompt, result.prompt_logprobs["a"])
    runner.execute(StepPlan(2, [], [], {}, ["a"]))


@pytest.mark.gpu
def test_on_gpu_nothing_waits_for_the_device(tiny, monkeypatch) -> None:
    """On CUDA (fp32, decode graphs captured): the same numbers, and the prompt logprobs' launch
    never synchronizes (it runs while the previous step may still be on the device)."""
    folder, hf_model = tiny("llama", REAL_INIT)
    runner = make_runner(str(folder), device="cuda", max_model_len=256)
    launch = runner.prompt_logprobs.launch

    def without_syncs(*args: object) -> None:
        torch.cuda.set_sync_debug_mode("error")
        try:
            launch(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(runner.prompt_logprobs, "launch", without_syncs)
    rng = random.Random(4)
    prompt, other = [rng.randrange(2, 320) for _ in range(60)], [rng.randrange(2, 320) for _ in range(5)]
    chunks = run_chunks_beside_a_decode(runner, prompt, other)
    check_against(reference(hf_model, prompt), prompt, joined(chunks), k=2)
