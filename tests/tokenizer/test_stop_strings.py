"""Stop strings on streamed text, and the tokenizer's per-sample output state, without processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import EngineConfig, Logprobs, SamplingParams, TokenOutput
from tokenizer_svc.output_processor import OutputProcessor
from tokenizer_svc.stop_strings import StopStringMatcher
from tokenizer_svc.tokenizer_loader import load_tokenizer


def stream(stop: list[str], pieces: list[str], include: bool = False) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stop, include)
    released = []
    for i, piece in enumerate(pieces):
        text, hit = matcher.feed(piece, final=i == len(pieces) - 1)
        released.append(text)
        if hit is not None:
            return "".join(released), hit
    return "".join(released), None


def test_stop_string_split_over_three_pieces_is_trimmed() -> None:
    assert stream(["abc"], ["xxa", "b", "cyy"]) == ("xx", "abc")
    assert stream(["abc"], ["xxa", "b", "cyy"], include=True) == ("xxabc", "abc")


def test_text_that_could_start_a_stop_string_is_held_back_then_released() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("hello E") == ("hello", None)  # " E" could begin "END"
    assert matcher.feed("N") == (" ", None)
    assert matcher.feed("d!", final=True) == ("ENd!", None)


def test_no_check_before_min_tokens_still_holds_back() -> None:
    matcher = StopStringMatcher(["ab"])
    assert matcher.feed("xab", check=False) == ("xa", None)
    assert matcher.feed("c") == ("b", None)
    assert matcher.feed("ab") == ("c", "ab")


pieces_of_abc = st.lists(st.text(alphabet="abc", max_size=4), min_size=1, max_size=8)
stops_of_abc = st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3)


@given(pieces=pieces_of_abc, stop=stops_of_abc, include=st.booleans())
def test_streamed_stop_strings_match_the_whole_text(pieces: list[str], stop: list[str], include: bool) -> None:
    text = "".join(pieces)
    released, hit = stream(stop, pieces, include)
    if not any(s in text for s in stop):
        assert (released, hit) == (text, None)
        return
    assert hit in stop
    kept = released if include else released + hit
    assert text.startswith(kept) and kept.endswith(hit)
    # The text before the hit holds no whole stop string: none was passed over.
    assert not any(s in kept[: -len(hit)] for s in stop)


# ---- the output processor with the real tokenizer ------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


def outputs_of(tokenizer, text: str, rid: str = "r", index: int = 0) -> list[TokenOutput]:
    return [TokenOutput(rid, [t], None, 3, index) for t in tokenizer.encode(text)]


def test_stop_string_finishes_one_sample_and_aborts_only_it(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", [1, 2, 3], SamplingParams(n=2, stop=["world"]))
    texts, aborts = proc.process(outputs_of(tokenizer, "hello world and more", index=1))
    assert "".join(t.text for t in texts) == "hello "
    assert texts[-1].finish_reason == "stop" and texts[-1].stop_reason == "world" and texts[-1].index == 1
    assert len(texts) == len(tokenizer.encode("hello world")), "tokens after the hit are dropped"
    assert [(a.request_ids, a.reason, a.indices) for a in aborts] == [(["r"], "stop", [1])]
    assert len(proc) == 1, "sample 0 is still running"
    last = outputs_of(tokenizer, "bye")
    last[-1].finish_reason = "length"
    texts, aborts = proc.process(last)
    assert "".join(t.text for t in texts) == "bye" and aborts == [] and len(proc) == 0


def test_eos_is_left_out_of_the_text_and_a_stop_token_is_named(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    proc.eos_token_ids = {2}
    hi = tokenizer.encode("Hi")
    proc.add_request("a", [1], SamplingParams())
    proc.add_request("b", [1], SamplingParams(stop_token_ids=hi[-1:], include_stop_str_in_output=True))
    texts, _ = proc.process([TokenOutput("a", hi, None, 1), TokenOutput("a", [2], "stop", 1),
                             TokenOutput("b", hi, "stop", 1)])
    assert [(t.text, t.stop_reason) for t in texts] == [("Hi", None), ("", None), ("Hi", hi[-1])]
    assert texts[1].completion_tokens == len(hi) + 1


def test_echo_and_logprob_token_texts(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", [1], SamplingParams(logprobs=1), prompt_text="Say:")
    ids = tokenizer.encode(" yes")
    lp = Logprobs([-0.5] * len(ids), [[i] for i in ids], [[-0.5]] * len(ids))
    [out], _ = proc.process([TokenOutput("r", ids, "length", 1, 0, lp)])
    assert out.prompt_text == "Say:" and out.text == " yes"
    assert out.logprobs is not None and "".join(out.logprobs.tokens) == " yes"
    assert out.logprobs.top_tokens == [[t] for t in out.logprobs.tokens]


def test_a_resubmission_carries_each_samples_outputs_so_far_and_which_finished(tokenizer) -> None:
    proc = OutputProcessor(tokenizer)
    proc.add_request("r", [1, 2, 3], SamplingParams(n=3, max_tokens=8, stop=["world"]), arrival_time=5.0)
    hello, world = tokenizer.encode("hello"), tokenizer.encode("hello world")
    proc.process([TokenOutput("r", hello, None, 3, 0), TokenOutput("r", world, None, 3, 1)])
    again = proc.resubmission("r", "tokenizer-1", "scheduler-2")
    # Sample 1 stopped on its stop string (the scheduler may never have heard); sample 2 had nothing yet.
    assert again.output_token_ids == [hello, world, []] and again.finished_samples == {1: "stop"}
    assert again.prompt_token_ids == [1, 2, 3] and again.reply_to == "tokenizer-1"
    assert again.arrival_time == 5.0 and again.resume and again.scheduler_id == "scheduler-2"
