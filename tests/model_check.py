"""Driving a `ModelRunner` and a transformers model on the same prompts, for the model tests.

`runner_greedy` sends the StepPlans a scheduler would (all prompts prefilled in one step,
then one decode step at a time, blocks from a shuffled pool); `runner_last_logits` runs one
batched prefill through the paged cache and returns each prompt's last-position logits.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from gpu_worker.attention import AttentionMetadata
from gpu_worker.model_runner import ModelRunner
from protocol.config import EngineConfig
from protocol.messages import CachedRequestData, NewRequestData, SamplingParams, StepPlan

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
PROMPT_LENGTHS = (3, 17, 40)  # inside one block, across blocks, a partial last block (block size 8)
MAX_TOKENS = 32
BLOCK_SIZE = 8


def random_prompts(vocab_size: int, lengths: tuple[int, ...] = PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def make_runner(model: str, device: str = "cpu", dtype: str = "float32", **kw: object) -> ModelRunner:
    kw.setdefault("max_num_seqs", 16)  # on a GPU: few decode graphs to capture
    config = EngineConfig(
        model=model, device=device, dtype=dtype, block_size=BLOCK_SIZE, num_gpu_blocks_override=64, **kw
    )
    return ModelRunner(config)


def runner_greedy(runner: ModelRunner, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    free = list(range(runner.num_blocks))
    random.Random(1).shuffle(free)
    ids = [f"req-{i}" for i in range(len(prompts))]
    num_blocks = dict.fromkeys(ids, 0)
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}

    def blocks_for(rid: str, num_tokens: int) -> list[int]:
        new = [free.pop() for _ in range(math.ceil(num_tokens / runner.block_size) - num_blocks[rid])]
        num_blocks[rid] += len(new)
        return new

    new = [NewRequestData(rid, p, GREEDY, blocks_for(rid, len(p)), 0) for rid, p in zip(ids, prompts)]
    plan = StepPlan(0, new, [], {rid: len(p) for rid, p in zip(ids, prompts)}, [])
    for step in range(1, max_tokens + 1):
        result = runner.execute(plan)
        assert sorted(result.request_ids) == ids
        for rid, token in zip(result.request_ids, result.token_ids):
            outputs[rid].append(token)
        # Each request decodes its newest token, at position len(prompt) + outputs - 1.
        computed = {rid: len(p) + len(outputs[rid]) - 1 for rid, p in zip(ids, prompts)}
        cached = [CachedRequestData(rid, blocks_for(rid, computed[rid] + 1), computed[rid]) for rid in ids]
        plan = StepPlan(step, [], cached, dict.fromkeys(ids, 1), [])
    runner.execute(StepPlan(max_tokens + 1, [], [], {}, ids))  # leave the runner clean
    return [outputs[rid] for rid in ids]


@torch.inference_mode()
def runner_last_logits(runner: ModelRunner, prompts: list[list[int]], last: int = 1) -> torch.Tensor:
    """[len(prompts) * last, vocab] fp32: one batched prefill through the paged cache, the logits
    of each prompt's `last` final positions (prompt by prompt)."""
    free = list(range(runner.num_blocks))
    random.Random(2).shuffle(free)
    block_size = runner.block_size
    max_blocks = max(math.ceil(len(p) / block_size) for p in prompts)
    input_ids, positions, slots, tables, starts = [], [], [], [], [0]
    for prompt in prompts:
        blocks = [free.pop() for _ in range(math.ceil(len(prompt) / block_size))]
        tables.append(blocks + [0] * (max_blocks - len(blocks)))
        for i, token in enumerate(prompt):
            input_ids.append(token)
            positions.append(i)
            slots.append(blocks[i // block_size] * block_size + i % block_size)
        starts.append(starts[-1] + len(prompt))
    device = runner.device
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
    )
    hidden = runner.model(torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), meta)
    ends = torch.tensor(starts[1:], device=device)
    rows = (ends[:, None] - last + torch.arange(last, device=device)[None, :]).flatten()
    return runner.model.compute_logits(hidden[rows]).float().cpu()


def hf_greedy(hf_model: torch.nn.Module, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    device = next(hf_model.parameters()).device
    outputs = []
    for prompt in prompts:
        # eos_token_id=None: run past EOS without masking it, as ignore_eos does.
        out = hf_model.generate(
            torch.tensor([prompt], device=device),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


# The embedded GGUF runs its 4-bit matmuls with bf16 activations on the CPU: teacher-forced
# against transformers' fp32 on the same weights, the difference between the two likeliest
# tokens' logits errs by up to 0.30 (docs/BENCHMARKS.md), so greedy decoding may take the other
# of two tokens whose logits are that close.
NEAR_TIE = 0.5


@dataclass
class GreedyReference:
    """transformers' greedy continuation of a prompt, and the logits each token was chosen from."""

    token_ids: list[int]
    scores: list[torch.Tensor]  # [vocab] fp32, one per token


def hf_greedy_reference(hf_model: torch.nn.Module, prompt: list[int], max_tokens: int) -> GreedyReference:
    device = next(hf_model.parameters()).device
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt], device=device), max_new_tokens=max_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return GreedyReference(out.sequences[0, len(prompt) :].tolist(), [s[0].float().cpu() for s in out.scores])


def assert_greedy_equal_up_to_near_ties(
    ours: list[int], hf_model: torch.nn.Module | None, prompt: list[int], tie: float = NEAR_TIE,
    reference: GreedyReference | None = None,
) -> None:
    """`ours` is transformers' greedy continuation of `prompt`, or leaves it at a position where
    transformers' own logits for its token and for ours are within `tie` (then the rest differs
    anyway and is not compared). `reference`: that continuation already computed, at least
    len(ours) tokens of it (else `hf_model` computes it)."""
    ref = reference or hf_greedy_reference(hf_model, prompt, len(ours))
    expected = ref.token_ids[: len(ours)]
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        if a != b:
            scores = ref.scores[i]
            gap = (scores[b] - scores[a]).item()
            assert gap <= tie, f"token {i}: {a} instead of transformers' {b}, whose logit is {gap:.3f} higher"
            return


@torch.inference_mode()
def hf_last_logits(hf_model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    device = next(hf_model.parameters()).device
    return torch.stack([hf_model(torch.tensor([p], device=device)).logits[0, -1].float().cpu() for p in prompts])


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The worst row's max |difference| over that row's max |reference|."""
    diff = (ours.float() - reference.float()).abs().amax(-1)
    return (diff / reference.float().abs().amax(-1)).max().item()
