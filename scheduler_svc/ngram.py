"""N-gram (prompt-lookup) drafts: guess the next tokens by finding the sequence's own ending earlier in it.

Text that copies from its context (code edits, quotes, summaries, structured output that
repeats its keys) continues an earlier passage: if the last n tokens appeared before, the
tokens that followed them then are a good guess for what follows now. The guess costs no
model call, but it runs on the host for every request at every step, so it is a few numpy
passes over the sequence and no Python loop over its tokens: every earlier position holding
the last token is a candidate, and one [candidates, max_n] comparison gives how far back
each one agrees with the sequence's ending.

The rule is vLLM's `NgramProposer` (`prompt_lookup_min`, `prompt_lookup_max`,
`num_speculative_tokens`): the longest n in [min_n, max_n] for which the last n tokens occur
earlier (an occurrence may overlap the ending, but not be it), and the up to k tokens that
followed that occurrence. Among the occurrences of that n-gram this takes the latest by
default, where vLLM takes the earliest: the latest is the passage being copied most
recently, the better guess when a text repeats with edits; `latest=False` gives vLLM's.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: np.ndarray, min_n: int, max_n: int, k: int, *, latest: bool = True) -> np.ndarray:
    """Up to k draft tokens for a request whose prompt and outputs so far are `token_ids` (1-D ints).

    They are the tokens after an earlier occurrence of the sequence's last n tokens, n the
    largest in [min_n, max_n] that occurs, the occurrence the latest (`latest`) or earliest
    of that n-gram; fewer than k where the sequence ends first (never none when a match is
    found), and an empty array (the input's dtype) when no n-gram of at least min_n recurs.
    The caller caps k by what the model's context still holds.
    """
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tokens.shape}")
    if not 1 <= min_n <= max_n:
        raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
    length = len(tokens)
    none = tokens[:0].copy()
    if k <= 0 or length <= min_n:
        return none
    # Where an earlier occurrence could end: before the last position, on the last token.
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    if len(ends) == 0:
        return none
    # agree[c, j]: tokens[ends[c] - j] == tokens[-1 - j]; a match's length is its run of
    # agreement from j = 0, capped at max_n (positions before the start never agree).
    back = np.arange(min(max_n, length - 1))
    at = ends[:, None] - back
    agree = (tokens[np.maximum(at, 0)] == tokens[length - 1 - back]) & (at >= 0)
    match_len = np.logical_and.accumulate(agree, axis=1).sum(axis=1)
    longest = match_len.max()
    if longest < min_n:
        return none
    best = np.flatnonzero(match_len == longest)
    end = ends[best[-1] if latest else best[0]]
    return tokens[end + 1 : end + 1 + k].copy()
