"""Incremental detokenization with the embedded model's real tokenizer."""

import pytest

from protocol import EngineConfig
from tokenizer_svc.detokenizer import IncrementalDetokenizer
from tokenizer_svc.tokenizer_loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


@pytest.mark.parametrize("text", [
    "Hello, world! The capital of France is Paris.",
    "emoji 🎉🚀 and CJK 北京欢迎你 mixed: é ñ ü",
    "  leading spaces\nand\ttabs  ",
])
def test_streamed_pieces_concatenate_to_the_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_half_a_character_is_held_back(tokenizer):
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1, "the test needs an emoji split over several tokens"
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids[:1]) == ""
    assert detok.add(ids[1:]) == "🎉"
