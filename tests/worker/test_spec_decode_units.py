"""Speculative decoding's building blocks alone: the rejection sampler (greedy rows, the exact target
distribution of random rows, the acceptance counts) and the n-gram proposer."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from gpu_worker.spec_decode.rejection_sampler import AcceptanceStats, acceptance_stats, rejection_sample
from scheduler_svc.ngram import propose_ngram

VOCAB = 12
NUM_ROWS = 200_000  # rows of the distribution tests: one batch, every row the same distributions


def distributions(num: int, gen: torch.Generator, zeros: dict[int, list[int]] | None = None) -> torch.Tensor:
    """[num, VOCAB] distributions with no tiny entries (each nonzero >= ~1 / (6 VOCAB)), and
    `zeros[i]` the tokens forced to 0 in row i (a top-k truncation, a draft's blind spots)."""
    probs = torch.rand(num, VOCAB, generator=gen) + 0.2
    for row, tokens in (zeros or {}).items():
        probs[row, tokens] = 0
    return probs / probs.sum(dim=-1, keepdim=True)


def check_distribution(tokens: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """`tokens` are draws from `probs` [VOCAB]: none where p = 0, and a chi-square statistic
    below a bound that chance exceeds with probability < 1e-6."""
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    assert len(counts) == VOCAB, f"{what}: token ids outside the vocabulary"
    support = probs > 0
    assert counts[~support].sum() == 0, f"{what}: drew tokens with p = 0: {counts.tolist()}"
    expected = probs.double()[support] * len(tokens)
    assert expected.min() >= 50, f"{what}: too few samples for the test ({len(tokens)})"
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    df = int(support.sum()) - 1
    assert chi2 < df + 8 * math.sqrt(2 * df) + 10, f"{what}: chi2 {chi2:.1f} with {df} dof, counts {counts.tolist()}"


def check_structure(out_tokens: torch.Tensor, num_accepted: torch.Tensor, drafts: torch.Tensor) -> None:
    """Each row: its first num_accepted drafts, one token, then -1."""
    k = drafts.shape[1]
    columns = torch.arange(k + 1)
    padded = torch.cat([drafts, torch.full((len(drafts), 1), -1)], dim=1)
    before = columns < num_accepted[:, None]
    assert torch.equal(out_tokens[before], padded[before])
    assert (out_tokens.gather(1, num_accepted[:, None]) >= 0).all()
    assert (out_tokens[columns > num_accepted[:, None]] == -1).all()


def target_argmax_case(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random target distributions [B=k+1, k+1, VOCAB] and their argmax."""
    gen = torch.Generator().manual_seed(seed)
    probs = (torch.randn(k + 1, k + 1, VOCAB, generator=gen) * 3).softmax(dim=-1)
    return probs, probs.argmax(dim=-1)


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_greedy_keeps_drafts_until_the_first_mismatch_then_takes_the_argmax(with_draft_probs: bool) -> None:
    k = 4
    target, best = target_argmax_case(k)
    # Row r's drafts match the argmax except at position r (row k: everywhere); the drafts
    # after a mismatch match again, and must still not be kept.
    drafts = best[:, :k].clone()
    for row in range(k):
        drafts[row, row] = (best[row, row] + 1) % VOCAB
    draft_probs = torch.full((k + 1, k, VOCAB), 1 / VOCAB) if with_draft_probs else None
    out = rejection_sample(drafts, torch.full((k + 1,), k), draft_probs, target, torch.ones(k + 1, dtype=torch.bool))

    for row in range(k + 1):
        expected = best[row, : row + 1].tolist() + [-1] * (k - row)
        assert out.token_ids[row].tolist() == expected, f"row {row}"
    assert out.num_accepted.tolist() == list(range(k + 1))


def test_greedy_respects_each_rows_number_of_drafts() -> None:
    k = 4
    target, best = target_argmax_case(k, seed=1)
    num_draft = torch.tensor([0, 1, 2, 3, 4])
    # The padding holds the argmax itself in rows 0-1 (kept if the padding were read), token 0
    # being the argmax there (the id padding may be read as), and -1 in rows 2-3.
    target[:2, :, 0] = 2.0
    best = target.argmax(dim=-1)
    drafts = best[:, :k].clone()
    drafts[2, 2:] = -1
    drafts[3, 3:] = -1
    out = rejection_sample(drafts, num_draft, None, target, torch.ones(k + 1, dtype=torch.bool))

    for row, n in enumerate(num_draft.tolist()):
        assert out.token_ids[row].tolist() == best[row, : n + 1].tolist() + [-1] * (k - n), f"row {row}"
    assert out.num_accepted.tolist() == num_draft.tolist()


def test_greedy_rows_ignore_the_random_draws_around_them() -> None:
    k = 3
    target, best = target_argmax_case(k, seed=2)
    drafts = best[:, :k].clone()
    drafts[1, 1] = (best[1, 1] + 1) % VOCAB
    greedy = torch.tensor([True, True, False, False])
    outs = [
        rejection_sample(drafts, torch.full((4,), k), None, target, greedy, torch.Generator().manual_seed(s))
        for s in range(20)
    ]
    for out in outs:
        assert out.token_ids[0].tolist() == best[0].tolist()
        assert out.token_ids[1].tolist() == [best[1, 0].item(), best[1, 1].item(), -1, -1]
    # The random rows do draw: their last tokens are not all the same over 20 seeds.
    assert len({tuple(out.token_ids[2:].flatten().tolist()) for out in outs}) > 1


def test_random_drafts_leave_the_target_distribution_unchanged() -> None:
    """q drafts, p verifies: the token at each position is distributed as p there, q's zeros
    and p's zeros (where the other is not) included."""
    k = 3
    gen = torch.Generator().manual_seed(0)
    # p: a top-k-like truncation at each position, and at position 0 tokens q never drafts.
    target = distributions(k + 1, gen, {0: [0, 1, 2, 9], 1: [3, 4], 2: [0, 11], 3: [5, 6, 7]})
    draft = distributions(k, gen, {0: [9, 10, 11], 1: [0, 1], 2: [5]})  # q > 0 on p's zeros too
    draft[0, 0] += 0.5  # q heavy on a token p forbids at 0: rejected every time
    draft /= draft.sum(dim=-1, keepdim=True)
    drafts = torch.multinomial(draft, NUM_ROWS, replacement=True, generator=gen).T.contiguous()

    out = rejection_sample(
        drafts,
        torch.full((NUM_ROWS,), k),
        draft.expand(NUM_ROWS, k, VOCAB),
        target.expand(NUM_ROWS, k + 1, VOCAB),
        torch.zeros(NUM_ROWS, dtype=torch.bool),
        generator=gen,
    )

    check_structure(out.token_ids, out.num_accepted, drafts)
    # Given the drafts before it were kept, the token at position j (a kept draft, a residual
    # draw or the bonus token) is distributed as target[j].
    for j in range(k + 1):
        check_distribution(out.token_ids[out.num_accepted >= j, j], target[j], f"position {j}")
    # A draft is kept with probability sum_x min(p(x), q(x)): 5 standard deviations.
    for j in range(k):
        reached = out.num_accepted >= j
        rate = (out.num_accepted[reached] > j).double().mean().item()
        expected = torch.minimum(target[j], draft[j]).sum().item()
        assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / reached.sum().item()), j
    # A draft p gives no chance (tokens 0-2 at position 0, drafted ~45% of the time) is never kept.
    assert (drafts[:, 0] <= 2).sum() > NUM_ROWS / 3
    assert not ((out.num_accepted >= 1) & (drafts[:, 0] <= 2)).any()


def test_ngram_drafts_leave_the_target_distribution_unchanged() -> None:
    """One-hot q (n-gram drafts, any token, p's zeros included) and rows with fewer drafts than k."""
    k = 3
    gen = torch.Generator().manual_seed(1)
    target = distributions(k + 1, gen, {0: [0, 1, 2, 3], 1: [4], 2: [5, 6, 7, 8, 9], 3: [11]})
    # A peaked p (~0.6 on one token) at each draft position, drafted by 70% of the rows (so
    # enough rows get far), the others drafting any token, p's zeros included.
    peaks = torch.tensor([10, 10, 4])
    target[torch.arange(k), peaks] += 12
    target /= target.sum(dim=-1, keepdim=True)
    drafts = torch.randint(0, VOCAB, (NUM_ROWS, k), generator=gen)
    on_peak = torch.rand(NUM_ROWS, k, generator=gen) < 0.7
    drafts = torch.where(on_peak, peaks, drafts)
    num_draft = torch.randint(0, k + 1, (NUM_ROWS,), generator=gen)
    drafts[torch.arange(k) >= num_draft[:, None]] = -1

    out = rejection_sample(
        drafts, num_draft, None, target.expand(NUM_ROWS, k + 1, VOCAB), torch.zeros(NUM_ROWS, dtype=torch.bool), gen
    )

    check_structure(out.token_ids, out.num_accepted, drafts)
    assert (out.num_accepted <= num_draft).all()
    for j in range(k + 1):
        check_distribution(out.token_ids[out.num_accepted >= j, j], target[j], f"position {j}")
    # Rows without drafts just sample position 0.
    check_distribution(out.token_ids[num_draft == 0, 0], target[0], "no drafts")
    assert (out.token_ids[num_draft == 0, 1:] == -1).all()
    # A drafted token x is kept with probability p(x): token 10 at position 1 (p ~ 0.6).
    reached = (out.num_accepted >= 1) & (num_draft >= 2) & (drafts[:, 1] == 10)
    rate = (out.num_accepted[reached] >= 2).double().mean().item()
    p = target[1, 10].item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / reached.sum().item())
    # and never when p(x) = 0.
    assert not ((num_draft >= 1) & (drafts[:, 0] <= 3) & (out.num_accepted >= 1)).any()


def test_drafts_from_the_target_itself_are_all_kept() -> None:
    k = 4
    rows = 100_000
    gen = torch.Generator().manual_seed(2)
    target = distributions(k + 1, gen, {0: [0, 1], 2: [7], 4: [3, 4, 5]})
    drafts = torch.multinomial(target[:k], rows, replacement=True, generator=gen).T.contiguous()
    out = rejection_sample(
        drafts,
        torch.full((rows,), k),
        target[:k].expand(rows, k, VOCAB),
        target.expand(rows, k + 1, VOCAB),
        torch.zeros(rows, dtype=torch.bool),
        gen,
    )
    assert (out.num_accepted == k).all()
    assert torch.equal(out.token_ids[:, :k], drafts)
    check_distribution(out.token_ids[:, k], target[k], "bonus")
    stats = acceptance_stats(torch.full((rows,), k), out.num_accepted, k)
    assert stats.num_accepted_tokens / stats.num_draft_tokens == 1.0
    assert stats.accepted_per_position == [rows] * k


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    k = 3
    gen = torch.Generator().manual_seed(3)
    target = distributions(k + 1, gen)
    draft = distributions(k, gen)

    def seeded_row_tokens(batch: int, batch_seed: int) -> list[int]:
        drafts = torch.multinomial(draft, batch, replacement=True, generator=gen).T.contiguous()
        drafts[0] = torch.tensor([1, 2, 3])
        out = rejection_sample(
            drafts,
            torch.full((batch,), k),
            draft.expand(batch, k, VOCAB),
            target.expand(batch, k + 1, VOCAB),
            torch.zeros(batch, dtype=torch.bool),
            torch.Generator().manual_seed(batch_seed),
            row_generators={0: torch.Generator().manual_seed(42)},
        )
        return out.token_ids[0].tolist()

    results = {tuple(seeded_row_tokens(batch, seed)) for batch, seed in [(1, 0), (5, 1), (64, 2), (300, 3)]}
    assert len(results) == 1
    # and a different seed for the row gives different tokens at least sometimes
    others = set()
    for seed in range(30):
        out = rejection_sample(
            torch.tensor([[1, 2, 3]]),
            torch.tensor([k]),
            draft[None],
            target[None],
            torch.tensor([False]),
            row_generators={0: torch.Generator().manual_seed(seed)},
        )
        others.add(tuple(out.token_ids[0].tolist()))
    assert len(others) > 1


def test_acceptance_stats_counts() -> None:
    stats = acceptance_stats(torch.tensor([3, 0, 2, 3, 1]), torch.tensor([3, 0, 1, 0, 1]), 3)
    assert stats == AcceptanceStats(
        num_drafts=4, num_draft_tokens=9, num_accepted_tokens=5, accepted_per_position=[3, 1, 1]
    )
    empty = acceptance_stats(np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64), 2)
    assert empty == AcceptanceStats(0, 0, 0, [0, 0])


def test_rejection_sample_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="target_probs"):
        rejection_sample(
            torch.zeros(2, 3, dtype=torch.int64), torch.full((2,), 3), None, torch.rand(2, 3, VOCAB), torch.ones(2)
        )


def ngram(tokens: list[int], min_n: int, max_n: int, k: int, **kwargs: bool) -> list[int]:
    return propose_ngram(np.array(tokens), min_n, max_n, k, **kwargs).tolist()


def reference_ngram(tokens: list[int], min_n: int, max_n: int, k: int, latest: bool) -> list[int]:
    """The rule read literally: for n from max_n down, every earlier occurrence of the last n tokens."""
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        starts = [s for s in range(len(tokens) - n) if tokens[s : s + n] == tokens[-n:]]
        if starts:
            start = starts[-1] if latest else starts[0]
            return tokens[start + n : start + n + k]
    return []


def test_ngram_continues_a_repeated_passage() -> None:
    passage = [11, 12, 13, 14, 15, 16, 17]
    tokens = [1, 2, *passage, 3, 4, *passage[:3]]
    assert ngram(tokens, 1, 3, 4) == [14, 15, 16, 17]
    proposal = propose_ngram(np.array(tokens, dtype=np.int32), 1, 3, 4)
    assert proposal.dtype == np.int32


def test_ngram_without_a_match_proposes_nothing() -> None:
    empty = propose_ngram(np.array([1, 2, 3, 4, 5]), 1, 3, 4)
    assert empty.shape == (0,) and empty.dtype == np.array([1]).dtype
    assert ngram([7], 1, 3, 4) == []
    assert ngram([], 1, 3, 4) == []
    assert ngram([1, 2, 1], 1, 3, 0) == []


def test_ngram_respects_min_n_and_max_n() -> None:
    # Only the last token recurs (a 1-gram match).
    assert ngram([5, 6, 7, 8, 9, 5], 2, 3, 2) == []
    assert ngram([5, 6, 7, 8, 9, 5], 1, 3, 2) == [6, 7]
    # [1, 2, 3] occurs first (followed by 20), only [2, 3] later (followed by 30): the longest
    # match within max_n wins, recency only among equally long ones.
    tokens = [1, 2, 3, 20, 21, 9, 2, 3, 30, 31, 8, 1, 2, 3]
    assert ngram(tokens, 1, 3, 2) == [20, 21]
    assert ngram(tokens, 1, 2, 2) == [30, 31]
    assert ngram(tokens, 3, 3, 2) == [20, 21]
    assert ngram(tokens, 4, 5, 2) == []


def test_ngram_takes_the_latest_occurrence() -> None:
    tokens = [1, 2, 50, 51, 1, 2, 60, 61, 1, 2]
    assert ngram(tokens, 2, 2, 2) == [60, 61]
    assert ngram(tokens, 2, 2, 2, latest=False) == [50, 51]  # vLLM's choice


def test_ngram_stops_at_k_and_at_the_end_of_the_sequence() -> None:
    assert ngram([1, 2, 3, 4, 1, 2], 2, 2, 10) == [3, 4, 1, 2]
    assert ngram([1, 2, 3, 4, 1, 2], 2, 2, 2) == [3, 4]
    # An occurrence overlapping the ending: [5, 5, 5] at 0..2 leaves one token after it.
    assert ngram([5, 5, 5, 5], 2, 3, 3) == [5]


def test_ngram_matches_the_rule_on_random_sequences() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        tokens = rng.integers(0, int(rng.integers(1, 5)), int(rng.integers(1, 30))).tolist()
        min_n = int(rng.integers(1, 4))
        max_n = int(rng.integers(min_n, 6))
        k = int(rng.integers(1, 6))
        for latest in (True, False):
            assert ngram(tokens, min_n, max_n, k, latest=latest) == reference_ngram(tokens, min_n, max_n, k, latest), (
                tokens,
                min_n,
                max_n,
                k,
                latest,
            )


@pytest.mark.parametrize("vocab", [32_000, 3])  # few candidates; a third of the sequence a candidate
def test_ngram_is_fast_on_long_sequences(vocab: int) -> None:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab, 4000)
    tokens[-200:] = tokens[1000:1200]  # the output copying a passage of the prompt
    assert len(propose_ngram(tokens, 1, 4, 5)) == 5
    start = time.perf_counter()
    for _ in range(100):
        propose_ngram(tokens, 1, 4, 5)
    assert (time.perf_counter() - start) / 100 < 5e-3
