"""Sampling parameters as columns by row, and the `SamplingMetadata` of one step.

Every live request owns a row (the input batch's). Its parameters sit in host numpy columns,
read to decide which sampling steps a batch needs (no device tensor is ever tested, which
would make the host wait), and in device columns, updated by row as requests join and read
by the sampler's arithmetic. The irregular ones (logit bias, stop token ids, seeds'
generators) stay Python objects by row, touched only for the rows that use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_worker.transfer import to_device
from protocol.messages import SamplingParams

# The most alternatives a request may ask logprobs for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive positions over the seed space

# The fp32 columns, in the order of `SamplingColumns.values`' rows.
TEMPERATURE, TOP_P, MIN_P, REPETITION, FREQUENCY, PRESENCE = range(6)
NUM_VALUES = 6


@dataclass
class Penalties:
    """The rows with repetition, frequency or presence penalties, and the tokens they count."""

    index: torch.Tensor  # [P] their indices among the step's sampling rows
    repetition: torch.Tensor | None  # [P] fp32; None when every repetition penalty is 1
    frequency: torch.Tensor  # [P] fp32
    presence: torch.Tensor  # [P] fp32
    prompt_ids: list[np.ndarray]  # each row's prompt tokens (read for the repetition penalty)
    output_ids: list[np.ndarray]  # each row's outputs so far


@dataclass
class RandomRows:
    """The rows drawn at random (the others take the argmax), with their parameters on the device."""

    index: torch.Tensor  # [R] their indices among the step's sampling rows
    temperature: torch.Tensor  # [R] fp32
    min_p: torch.Tensor | None  # [R]; None when no row uses min-p
    top_p: torch.Tensor  # [R]
    top_k_host: np.ndarray  # [R] int64 (off: <= 0), with top_p_host: which rows filter (vocab-dependent)
    top_p_host: np.ndarray  # [R] fp32
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # by index in R: seeded rows


@dataclass
class SamplingMetadata:
    """What the sampler needs to choose one token for each of N rows of logits."""

    num_rows: int
    # Every row greedy with nothing to change its logits and no logprobs: the argmax is all.
    plain_argmax: bool
    max_num_logprobs: int | None = None  # the most alternatives a row asked for; None: no logprobs
    logit_bias: tuple[list[int], list[int], list[float]] | None = None  # (rows, token ids, bias)
    banned: tuple[list[int], list[int]] | None = None  # (rows, token ids) still below min_tokens
    penalties: Penalties | None = None
    random: RandomRows | None = None


class SamplingColumns:
    """The sampling parameters of every row, kept on the host and on the device."""

    def __init__(self, num_rows: int, device: torch.device, eos_token_ids: Sequence[int] = ()) -> None:
        self.device = device
        self.eos_token_ids = list(eos_token_ids)
        self.values = np.zeros((NUM_VALUES, num_rows), dtype=np.float32)  # TEMPERATURE..PRESENCE by row
        self.values_gpu = torch.zeros(NUM_VALUES, num_rows, dtype=torch.float32, device=device)
        self.top_k = np.zeros(num_rows, dtype=np.int64)
        self.greedy = np.zeros(num_rows, dtype=bool)
        self.plain_argmax = np.zeros(num_rows, dtype=bool)
        self.needs_history = np.zeros(num_rows, dtype=bool)
        self.has_bias = np.zeros(num_rows, dtype=bool)
        self.min_tokens = np.zeros(num_rows, dtype=np.int64)
        self.num_logprobs = np.full(num_rows, -1, dtype=np.int64)  # -1: none asked
        self.params: list[SamplingParams | None] = [None] * num_rows
        self.generators: list[torch.Generator | None] = [None] * num_rows  # seeded rows only
        self._stale: set[int] = set()  # rows whose device values are not written yet

    def grow(self, num_rows: int) -> None:
        """Room for `num_rows` rows, keeping every existing row."""
        extra = num_rows - len(self.greedy)
        self.values = np.concatenate([self.values, np.zeros((NUM_VALUES, extra), dtype=np.float32)], axis=1)
        self.values_gpu = torch.cat([self.values_gpu, torch.zeros(NUM_VALUES, extra, device=self.device)], dim=1)
        for name in ("top_k", "greedy", "plain_argmax", "needs_history", "has_bias", "min_tokens"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a, shape=extra)]))
        self.num_logprobs = np.concatenate([self.num_logprobs, np.full(extra, -1, dtype=np.int64)])
        self.params += [None] * extra
        self.generators += [None] * extra

    def add(self, row: int, p: SamplingParams) -> None:
        self.values[:, row] = (
            p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty, p.presence_penalty
        )
        self.top_k[row] = p.top_k
        self.greedy[row] = p.greedy
        self.needs_history[row] = p.needs_history
        self.has_bias[row] = bool(p.logit_bias)
        self.min_tokens[row] = p.min_tokens
        self.num_logprobs[row] = -1 if p.logprobs is None else p.logprobs
        self.plain_argmax[row] = (
            p.greedy and p.logprobs is None and not p.logit_bias and p.min_tokens == 0 and not p.needs_history
        )
        self.params[row] = p
        self.generators[row] = None if p.seed is None else torch.Generator(device=self.device).manual_seed(p.seed)
        self._stale.add(row)

    def remove(self, row: int) -> None:
        self.params[row] = self.generators[row] = None
        self._stale.discard(row)

    def _device_values(self) -> torch.Tensor:
        """The device columns, with the rows that joined since the last read written in."""
        if self._stale:
            rows = np.fromiter(self._stale, dtype=np.int64, count=len(self._stale))
            self._stale.clear()
            values = np.ascontiguousarray(self.values[:, rows])
            self.values_gpu[:, to_device(rows, self.device)] = to_device(values, self.device)
        return self.values_gpu

    def metadata(
        self,
        rows: np.ndarray,
        num_outputs: np.ndarray,
        history: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> SamplingMetadata:
        """The metadata of a step whose sampling rows are `rows` (in output order).

        `num_outputs[i]` is how many tokens row i has sampled so far (min_tokens and seeds count
        them); `history(row)` gives a row's (prompt, outputs) token ids, for the penalties.
        """
        n = len(rows)
        meta = SamplingMetadata(n, plain_argmax=bool(self.plain_argmax[rows].all()))
        if meta.plain_argmax:
            return meta
        num_logprobs = self.num_logprobs[rows]
        if (num_logprobs >= 0).any():
            meta.max_num_logprobs = int(num_logprobs.max())
        biased = np.flatnonzero(self.has_bias[rows])
        if len(biased):
            entries = [(i, t, b) for i in biased.tolist() for t, b in self._params(rows[i]).logit_bias.items()]
            if entries:
                meta.logit_bias = tuple(map(list, zip(*entries)))  # type: ignore[assignment]
        below = np.flatnonzero(num_outputs < self.min_tokens[rows])
        if len(below):
            stops = [(i, [*self.eos_token_ids, *self._params(rows[i]).stop_token_ids]) for i in below.tolist()]
            banned = [(i, t) for i, tokens in stops for t in tokens]
            if banned:
                meta.banned = tuple(map(list, zip(*banned)))  # type: ignore[assignment]
        penalized = np.flatnonzero(self.needs_history[rows])
        if len(penalized) and history is not None:
            meta.penalties = self._penalties(rows, penalized, history)
        random = np.flatnonzero(~self.greedy[rows])
        if len(random):
            meta.random = self._random_rows(rows, random, num_outputs)
        return meta

    def _params(self, row: int) -> SamplingParams:
        p = self.params[row]
        assert p is not None, f"row {row} has no request"
        return p

    def _penalties(
        self, rows: np.ndarray, penalized: np.ndarray, history: Callable[[int], tuple[np.ndarray, np.ndarray]]
    ) -> Penalties:
        values = self._device_values()[:, to_device(rows[penalized], self.device)]
        prompts, outputs = zip(*(history(int(r)) for r in rows[penalized]))
        any_repetition = bool((self.values[REPETITION, rows[penalized]] != 1.0).any())
        return Penalties(
            index=to_device(penalized, self.device),
            repetition=values[REPETITION] if any_repetition else None,
            frequency=values[FREQUENCY],
            presence=values[PRESENCE],
            prompt_ids=list(prompts),
            output_ids=list(outputs),
        )

    def _random_rows(self, rows: np.ndarray, random: np.ndarray, num_outputs: np.ndarray) -> RandomRows:
        chosen = rows[random]
        values = self._device_values()[:, to_device(chosen, self.device)]
        any_min_p = bool((self.values[MIN_P, chosen] > 0).any())
        generators = {}
        for j, (row, position) in enumerate(zip(chosen.tolist(), num_outputs[random].tolist())):
            p = self._params(row)
            if p.seed is not None:
                generators[j] = self._position_generator(row, p.seed, position)
        return RandomRows(
            index=to_device(random, self.device),
            temperature=values[TEMPERATURE],
            min_p=values[MIN_P] if any_min_p else None,
            top_p=values[TOP_P],
            top_k_host=self.top_k[chosen],
            top_p_host=self.values[TOP_P, chosen],
            generators=generators,
        )

    def _position_generator(self, row: int, seed: int, position: int) -> torch.Generator:
        """The row's generator, seeded for this output position: a seeded request's draws
        depend on its seed and position only (not on its batch, nor on a preemption)."""
        generator = self.generators[row]
        if generator is None:
            generator = self.generators[row] = torch.Generator(device=self.device)
        return generator.manual_seed((seed + position * _GOLDEN) % 2**64)
