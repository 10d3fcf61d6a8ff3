"""The worker's side of structured outputs: grammar masks on logits, matchers per row, and the
tokenizer pool's compiler (real llguidance, the embedded model's tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpu_worker.structured_outputs import GrammarMask, GrammarRows, apply_grammar_mask
from protocol import EngineConfig, SamplingParams
from protocol.messages import StructuredOutputs
from tokenizer_svc.structured_outputs import GrammarCompiler
from tokenizer_svc.tokenization import RequestRejected
from tokenizer_svc.tokenizer_loader import load_tokenizer


def _reference_mask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(rows):
        for t in range(logits.shape[1]):
            word = t // 32
            allowed = word < bitmask.shape[1] and (int(bitmask[i, word]) >> (t % 32)) & 1
            if not allowed:
                out[row, t] = float("-inf")
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("vocab", [96, 100, 200])  # exactly the words, a padded vocabulary, fewer words than tokens
def test_the_mask_forbids_exactly_the_tokens_whose_bits_are_clear(device, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 3), dtype=torch.int32, generator=gen)
    rows = [3, 1]
    expected = _reference_mask(logits, rows, bitmask)
    mask = GrammarMask(torch.tensor(rows, device=device), bitmask.to(device))
    got = apply_grammar_mask(logits.to(device), mask).cpu()
    assert torch.equal(got, expected)
    assert torch.equal(got[[0, 2, 4]], logits[[0, 2, 4]])  # the unconstrained rows are untouched


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


def test_matchers_follow_their_rows_tokens_and_replay_outputs(tokenizer):
    compiler = GrammarCompiler(tokenizer)
    grammar = compiler.compile(SamplingParams(structured_outputs=StructuredOutputs(choice=["yes", "no way"]))).grammar
    rows = GrammarRows(EngineConfig(), [tokenizer.eos_token_id])
    no_way = tokenizer.encode("no way", add_special_tokens=False)
    rows.add(7, grammar, [])
    rows.add(2, grammar, no_way[:1])  # a resumed request: its output so far is replayed

    def allowed(row_position: int) -> set[int]:
        mask = rows.mask(np.array([2, 5, 7]), torch.device("cpu"))
        assert mask is not None and mask.index.tolist() == [0, 2]  # row 5 has no grammar
        bits = mask.bitmask[row_position]
        return {t for t in range(len(tokenizer)) if (int(bits[t // 32]) >> (t % 32)) & 1}

    first = allowed(1)  # row 7, at the start
    assert tokenizer.encode("yes", add_special_tokens=False)[0] in first and no_way[0] in first
    assert tokenizer.encode("maybe", add_special_tokens=False)[0] not in first
    assert allowed(0) == set(no_way[1:2])  # row 2 can only go on with "no way"
    rows.advance(np.array([2]), [no_way[1]])
    if len(no_way) == 2:
        assert allowed(0) == {tokenizer.eos_token_id}  # its grammar is done: only the stop token
    rows.remove(7)
    assert rows.mask(np.array([7]), torch.device("cpu")) is None


def test_compiler_caches_by_constraint_and_rejects_bad_ones(tokenizer):
    compiler = GrammarCompiler(tokenizer)
    schema = StructuredOutputs(json=json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    first = compiler.compile(SamplingParams(structured_outputs=schema))
    again = compiler.compile(SamplingParams(temperature=0.5, structured_outputs=schema))
    assert first.grammar == again.grammar and compiler.misses == 1 and compiler.hits == 1
    assert compiler.compile(SamplingParams()).grammar is None
    for bad, field in [
        (StructuredOutputs(regex="(unclosed"), "structured_outputs"),
        (StructuredOutputs(json='{"type": "wat"}'), "response_format"),
        (StructuredOutputs(json="{nope"), "response_format"),
        (StructuredOutputs(grammar="start: missing_rule"), "structured_outputs"),
        (StructuredOutputs(choice=[]), "structured_outputs"),
        (StructuredOutputs(regex="a", choice=["a"]), "structured_outputs"),
    ]:
        with pytest.raises(RequestRejected) as err:
            compiler.compile(SamplingParams(structured_outputs=bad))
        assert err.value.param == field and err.value.status == 400 and "\n" not in err.value.message


def test_a_tokenizer_llguidance_cannot_read_is_a_clear_400():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "##b": 2}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    compiler = GrammarCompiler(BertTokenizerFast(tokenizer_object=tok))
    for _ in range(2):  # refused at once the second time too
        with pytest.raises(RequestRejected) as err:
            compiler.compile(SamplingParams(structured_outputs=StructuredOutputs(regex="a")))
        assert "not available for this model" in err.value.message
