"""Structured outputs in the worker: one grammar matcher per constrained row, token masks per step.

The tokenizer pool compiled and checked each grammar (tokenizer_svc/structured_outputs.py); a
row whose `SamplingParams.grammar` is set gets an llguidance matcher here, fed the request's
output tokens so far (a resumed request replays them). Each step the rows that sample get a
bitmask of the tokens their grammar allows next, computed on the host by llguidance's
executor while the device runs the forward, copied over, and applied to those rows' logits
only; unconstrained rows are not touched. Every tensor-parallel rank runs the same matchers
on the same tokens, so all ranks mask alike.

The end of a grammar allows only the model's stop tokens (all of them, as the scheduler
stops on any). A matcher that cannot go on (a token past the end, sampled by a step that was
already planned when the request finished) stops constraining its row: that token is dropped
by the scheduler anyway.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch

from gpu_worker.transfer import to_device
from protocol.config import EngineConfig

logger = logging.getLogger("pagoda.worker")

TEMPLATES = 256  # grammars kept compiled in the worker


class GrammarMask(NamedTuple):
    """The rows of a step's logits to constrain and, per row, a bitmask of the allowed tokens."""

    index: torch.Tensor  # [R] int64: rows of the step's logits
    bitmask: torch.Tensor  # [R, ceil(vocab / 32)] int32: bit t % 32 of word t // 32 set = token t allowed


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """`logits` with every token its row's grammar forbids at -inf (the other rows unchanged).

    Tokens beyond the bitmask's words (a vocabulary padded past the tokenizer's) are forbidden;
    bitmask words beyond the logits are ignored.
    """
    vocab = logits.shape[-1]
    if mask.bitmask.device.type == "cpu":  # numpy unpacks bits in one pass (torch's shifts take 20x longer)
        bits = np.unpackbits(mask.bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(bits).bool()
    else:
        shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
        allowed = ((mask.bitmask[:, :, None] >> shifts) & 1).flatten(1).bool()  # [R, words * 32]
    if allowed.shape[1] >= vocab:
        allowed = allowed[:, :vocab]
    else:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    rows = logits[mask.index].masked_fill(~allowed, float("-inf"))
    return logits.index_put((mask.index,), rows)


class GrammarRows:
    """The matchers of an input batch's constrained rows."""

    def __init__(self, config: EngineConfig, eos_token_ids: list[int]) -> None:
        self.config = config
        self.eos_token_ids = list(eos_token_ids)
        self.matchers: dict[int, Any] = {}
        # A matcher per grammar text, never fed: new rows start as its copy (compiling a grammar
        # takes about 1 ms, a copy 10 us; 128 new constrained requests in one step would block it).
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self._lltokenizer: Any = None
        self._executor: Any = None
        self._bitmask: torch.Tensor | None = None  # pinned host buffer, grown as needed

    def __bool__(self) -> bool:
        return bool(self.matchers)

    def _tokenizer(self) -> Any:
        """llguidance's tokenizer; None if it cannot read this one (False remembers that)."""
        if self._lltokenizer is False:
            return None
        if self._lltokenizer is None:
            import llguidance
            import llguidance.hf

            from tokenizer_svc.tokenizer_loader import load_tokenizer, tokenizer_json

            # Read on the first constrained request, in the step loop: from tokenizer.json where
            # there is one (0.5 s for 152k tokens); through transformers' tokenizer otherwise
            # (importing its tokenizer stack adds seconds: 5.9 s in all on the H200 machine).
            began = time.perf_counter()
            try:
                text = tokenizer_json(self.config)
                if text is not None:
                    self._lltokenizer = llguidance.LLTokenizer(text, eos_token=self.eos_token_ids)
                else:
                    self._lltokenizer = llguidance.hf.from_tokenizer(
                        load_tokenizer(self.config), eos_token=self.eos_token_ids
                    )
            except Exception as e:  # the tokenizer pool refuses constrained requests then (same reading)
                self._lltokenizer = False
                logger.warning("structured outputs unavailable: llguidance cannot read the tokenizer (%s)", e)
                return None
            self._executor = llguidance.LLExecutor()
            logger.info("structured outputs: llguidance read the vocabulary (%d tokens) in %.2f s",
                        self._lltokenizer.vocab_size, time.perf_counter() - began)
        return self._lltokenizer

    def add(self, row: int, grammar: str, output_token_ids: list[int]) -> None:
        """Start a matcher for `row`, at the end of the outputs it already has."""
        from llguidance import LLMatcher

        template = self._templates.get(grammar)
        if template is None:
            tokenizer = self._tokenizer()
            if tokenizer is None:
                return  # not constrained: no request gets here (the tokenizer pool refuses them)
            template = self._templates[grammar] = LLMatcher(tokenizer, grammar)
            if len(self._templates) > TEMPLATES:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(grammar)
        matcher = template.deep_copy()
        if output_token_ids and not matcher.consume_tokens(output_token_ids):
            logger.warning("row %d: its earlier outputs do not follow its grammar: %s", row, matcher.get_error())
        self.matchers[row] = matcher

    def remove(self, row: int) -> None:
        self.matchers.pop(row, None)

    def advance(self, rows: np.ndarray, token_ids: list[int]) -> None:
        """Feed each constrained row its sampled token."""
        for row, token in zip(rows.tolist(), token_ids):
            matcher = self.matchers.get(row)
            if matcher is not None and not matcher.is_stopped() and not matcher.is_error():
                matcher.consume_token(token)

    def constrained(self, rows: np.ndarray) -> np.ndarray:
        """Positions in `rows` that have a matcher."""
        if not self.matchers:
            return np.zeros(0, dtype=np.int64)
        return np.fromiter((i for i, r in enumerate(rows.tolist()) if r in self.matchers), dtype=np.int64)

    def mask(
        self, rows: np.ndarray, device: torch.device, positions: np.ndarray | None = None
    ) -> GrammarMask | None:
        """The bitmasks of the constrained ones among a step's sampling `rows` (`positions`, when
        the caller has them from `constrained`), on `device`; None when no row is constrained.

        Call it once every earlier step's tokens have been fed (`advance`): the masks follow them.
        """
        if positions is None:
            positions = self.constrained(rows)
        if len(positions) == 0:
            return None
        tokenizer = self._lltokenizer  # read: constrained rows exist
        words = (tokenizer.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < len(positions) or self._bitmask.shape[1] != words:
            size = max(len(positions), 2 * (0 if self._bitmask is None else self._bitmask.shape[0]), 8)
            self._bitmask = torch.empty(size, words, dtype=torch.int32, pin_memory=device.type == "cuda")
        host = self._bitmask[: len(positions)]
        live = []
        for i, row in enumerate(rows[positions].tolist()):
            matcher = self.matchers[row]
            if matcher.is_error():
                host[i].fill_(-1)  # past its end: no constraint (the scheduler drops this token)
            else:
                live.append((matcher, i))
        if live:
            # What llguidance.torch.fill_next_token_bitmask_par does, without importing that
            # module (8-10 s on the H200 machine, once: it stalled the first constrained request).
            assert host.is_contiguous()
            self._executor.unsafe_compute_mask_ptr(live, host.data_ptr(), words * 4, len(positions))
        # The pinned buffer is written again next step only after this step's tokens were waited
        # for (the runner finishes the previous step first), so its copy here is done by then.
        return GrammarMask(to_device(positions, device), host.to(device, non_blocking=True))
