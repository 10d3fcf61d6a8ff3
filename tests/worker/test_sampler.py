"""The sampler alone: each parameter's effect on known logits, seeds, logprobs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from gpu_worker.sampler import Sampler, SamplerOutput
from gpu_worker.sampling_metadata import SamplingColumns
from protocol import SamplingParams

VOCAB = 32
EOS = 31


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    token_ids: Sequence[Sequence[int]] | None = None,
    num_prompt_tokens: Sequence[int] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplerOutput:
    """Row i of `logits` sampled with `params[i]` through the worker's own path: sampling
    columns holding the rows (with `generators[i]` as row i's, where given), their metadata,
    the Sampler. `token_ids[i]` is row i's prompt and outputs so far, the first
    `num_prompt_tokens[i]` of them prompt."""
    n = len(params)
    columns = SamplingColumns(n, logits.device, eos_token_ids)
    for row, p in enumerate(params):
        columns.add(row, p)
        if generators[row] is not None and p.seed is not None:
            columns.generators[row] = generators[row]
    if token_ids is None:
        num_outputs, history = np.zeros(n, dtype=np.int64), None
    else:
        assert num_prompt_tokens is not None
        num_outputs = np.array([len(t) - p for t, p in zip(token_ids, num_prompt_tokens, strict=True)])

        def history(row: int) -> tuple[np.ndarray, np.ndarray]:
            tokens = np.asarray(token_ids[row], dtype=np.int64)
            return tokens[: num_prompt_tokens[row]], tokens[num_prompt_tokens[row] :]

    return Sampler()(logits, columns.metadata(np.arange(n), num_outputs, history))


def test_greedy_equals_top_k_1_at_any_temperature() -> None:
    logits = logits_rows(8)
    a = sample(logits, [greedy()] * 8, [None] * 8).token_ids
    b = sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 8, [None] * 8).token_ids
    assert a.tolist() == b.tolist() == logits.argmax(-1).tolist()


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = logits_rows(2)
    top = logits.argmax(-1).tolist()
    params = [greedy(logit_bias={top[0]: -100.0}), greedy(logit_bias={5: 100.0})]
    out = sample(logits, params, [None, None]).token_ids.tolist()
    assert out[0] != top[0] and out[1] == 5


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS] = 10.0
    logits[:, 7] = 9.0
    logits[:, 3] = 8.0
    params = [greedy(min_tokens=2, stop_token_ids=[7])] * 3
    prompt = [1, 2]
    histories = [prompt, prompt + [4], prompt + [4, 4]]  # 0, 1 and 2 outputs so far
    out = sample(logits, params, [None] * 3, histories, [2, 2, 2], eos_token_ids=[EOS]).token_ids.tolist()
    assert out == [3, 3, EOS]


def test_repetition_penalty_covers_prompt_and_outputs() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 4], logits[0, 5], logits[0, 6] = 2.0, -2.0, 1.9
    params = [greedy(repetition_penalty=2.0)]
    # 4 is in the prompt, 5 among the outputs: 4 drops to 1.0 (divided), 5 to -4.0 (multiplied).
    out = sample(logits, params, [None], [[4, 9, 5]], [2])
    assert out.token_ids.tolist() == [6]


def test_frequency_penalty_counts_outputs_and_presence_does_not() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 4], logits[:, 6] = 3.0, 1.5
    history = [[4, 4, 1, 4, 4]]  # prompt [4]; outputs [4, 1, 4, 4]: three 4s
    freq = sample(logits[:1], [greedy(frequency_penalty=0.6)], [None], history, [1]).token_ids
    presence = sample(logits[1:], [greedy(presence_penalty=1.0)], [None], history, [1]).token_ids
    assert freq.tolist() == [6]  # 3.0 - 3 * 0.6 = 1.2 < 1.5
    assert presence.tolist() == [4]  # 3.0 - 1.0 = 2.0 > 1.5


def test_penalties_leave_other_rows_alone() -> None:
    logits = logits_rows(2)
    top = logits.argmax(-1)
    histories = [[int(top[0])] * 3, [int(top[1])] * 3]
    params = [greedy(frequency_penalty=2.0, presence_penalty=2.0), greedy()]
    out = sample(logits, params, [None, None], histories, [1, 1]).token_ids
    assert out[0] != top[0] and out[1] == top[1]


def test_seeded_row_is_the_same_alone_and_in_any_batch() -> None:
    logits = logits_rows(6, seed=1)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    histories = [[1, 2, 3]] * 6
    alone = sample(logits[2:3], [seeded], [None], histories[:1], [2]).token_ids.item()
    for _ in range(5):
        params = [SamplingParams(temperature=1.0)] * 6
        params[2] = seeded
        batch = sample(logits, params, [torch.Generator()] * 6, histories, [2] * 6).token_ids
        assert batch[2].item() == alone


def test_seed_draws_depend_on_the_output_position_only() -> None:
    """A resumed (preempted) request draws at position p what it would have drawn anyway."""
    logits = torch.zeros(1, VOCAB)  # uniform: the draw is all noise
    params = [SamplingParams(temperature=1.0, seed=7)]
    used = torch.Generator()
    used.manual_seed(99)
    draws = [sample(logits, params, [None], [[0] + [1] * p], [1]).token_ids.item() for p in range(20)]
    again = [sample(logits, params, [used], [[0] + [1] * p], [1]).token_ids.item() for p in range(20)]
    assert draws == again
    assert len(set(draws)) > 5, "different positions draw different noise"
    other_seed = [SamplingParams(temperature=1.0, seed=8)]
    assert draws != [sample(logits, other_seed, [None], [[0] + [1] * p], [1]).token_ids.item() for p in range(20)]


def test_logprobs_are_raw_and_top_ones_sorted_with_the_greedy_token_first() -> None:
    logits = logits_rows(3)
    params = [greedy(logprobs=4), greedy(logprobs=0, logit_bias={0: 50.0}), SamplingParams(temperature=1.0)]
    out = sample(logits, params, [None] * 3)
    raw = logits.log_softmax(-1)
    assert out.top_logprob_ids is not None and out.top_logprobs is not None
    assert out.top_logprob_ids.shape == (3, 4)  # the largest k asked for in the batch
    torch.testing.assert_close(out.top_logprobs, raw.topk(4).values)
    assert out.top_logprob_ids[0, 0] == out.token_ids[0]
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    # Row 1 was forced to token 0 by its bias; its logprob is still the model's own.
    assert out.token_ids[1] == 0
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])


def test_bf16_logits_give_the_fp32_results() -> None:
    """The runner hands over logits in the model's dtype: an all-greedy batch takes their argmax
    as they are, any other batch is computed in fp32; either way the tokens are those of the fp32
    copy (ties included: bf16 rounds many values together here)."""
    logits = logits_rows(6, seed=4).to(torch.bfloat16)
    exact = logits.float()
    plain = [greedy()] * 6
    assert sample(logits, plain, [None] * 6).token_ids.tolist() == sample(exact, plain, [None] * 6).token_ids.tolist()
    mixed = [greedy(), greedy(logprobs=2), greedy(logit_bias={3: 100.0}), greedy(min_tokens=3),
             SamplingParams(temperature=1.0, seed=5), greedy(repetition_penalty=1.5)]
    kw = dict(token_ids=[[1, 2, 3]] * 6, num_prompt_tokens=[2] * 6, eos_token_ids=[EOS])
    ours, ref = sample(logits, mixed, [None] * 6, **kw), sample(exact, mixed, [None] * 6, **kw)
    assert ours.token_ids.tolist() == ref.token_ids.tolist()
    assert ours.token_ids[2].item() == 3
    assert ours.logprobs is not None and ours.logprobs.dtype == torch.float32
    torch.testing.assert_close(ours.logprobs, ref.logprobs)


def test_greedy_rows_take_the_exact_argmax_beside_random_rows() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    params = [greedy(), SamplingParams(temperature=1.0), SamplingParams(top_k=1), greedy()]
    out = sample(logits, params, [None] * 4)
    argmax = logits.argmax(-1)
    assert out.token_ids[[0, 2, 3]].tolist() == argmax[[0, 2, 3]].tolist()
    assert out.logprobs is None


def test_top_p_and_min_p_keep_only_the_likely_tokens() -> None:
    logits = torch.full((3, 50), -5.0)
    logits[:, 7] = 5.0  # ~0.996 of the mass
    logits[:, 8] = 0.0
    params = [
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.1),
        SamplingParams(top_k=2, temperature=100.0, top_p=1.0),
    ]
    for _ in range(20):
        tokens = sample(logits, params, [None] * 3).token_ids.tolist()
        assert tokens[0] == 7 and tokens[1] == 7 and tokens[2] in (7, 8)


def test_logprob_is_that_of_the_chosen_token_under_the_model() -> None:
    logits = torch.randn(2, 30)
    params = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=2.0)]
    out = sample(logits, params, [None, torch.Generator().manual_seed(3)])
    expected = logits.log_softmax(-1).gather(1, out.token_ids[:, None])[:, 0]
    torch.testing.assert_close(out.logprobs, expected)


@pytest.mark.gpu
def test_on_cuda_greedy_bias_penalties_and_seeds_match_the_cpu() -> None:
    logits = logits_rows(4, seed=2)
    params = [
        greedy(logit_bias={3: 5.0}, logprobs=3),
        greedy(frequency_penalty=1.0, repetition_penalty=1.3, min_tokens=5, stop_token_ids=[1]),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11),
        SamplingParams(temperature=1.0, top_k=5, min_p=0.05),
    ]
    histories = [[1, 2, 3, 4, 4]] * 4
    cpu = sample(logits, params, [None] * 4, histories, [2] * 4, eos_token_ids=[EOS])
    gpu = sample(logits.cuda(), params, [None] * 4, histories, [2] * 4, eos_token_ids=[EOS])
    # Rows 0-1 are greedy and must agree; rows 2-3 draw device-specific noise, so their tokens
    # (and the logprobs of those tokens) may differ between the CPU and the GPU.
    assert gpu.token_ids[:2].tolist() == cpu.token_ids[:2].tolist()
    torch.testing.assert_close(gpu.logprobs[:2].cpu(), cpu.logprobs[:2])
    torch.testing.assert_close(gpu.top_logprobs.cpu(), cpu.top_logprobs)
    seeded = [sample(logits.cuda()[2:3], params[2:3], [None], histories[:1], [2]).token_ids.item() for _ in range(3)]
    assert seeded == [gpu.token_ids[2].item()] * 3


@pytest.mark.gpu
def test_on_cuda_sampling_never_waits_for_the_device() -> None:
    """Random sampling with every filter, penalties, bias, min_tokens, seeds and logprobs
    queues its work without a device sync (a sync would stall the host until the previous
    step finished, undoing the overlap of steps)."""
    logits = torch.randn(7, 1000, device="cuda")
    params = [
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3),
        SamplingParams(temperature=0.7, min_p=0.05, logprobs=2),
        SamplingParams(temperature=1.0, logit_bias={7: 100.0}),
        SamplingParams(temperature=0.0, min_tokens=4),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.1),
    ]
    history = [[5, 6, 7, 8, 5]] * 7
    kw = dict(token_ids=history, num_prompt_tokens=[3] * 7, eos_token_ids=[EOS])
    sample(logits, params, [None] * 7, **kw)  # warm up: allocations, pinned host blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits, params, [None] * 7, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids[3].item() == 7
    assert out.token_ids[4].item() != EOS
