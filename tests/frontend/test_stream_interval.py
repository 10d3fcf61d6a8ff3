"""`--stream-interval N` (vLLM's): a streamed sample's first token goes out at once, then a chunk
every N tokens, and its last chunk when it finishes; the text and token ids are exactly those of
N = 1 (the session server) and of the non-streamed answer."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from protocol import EMBEDDED_MODEL_NAME
from tests.conftest import start_server

MODEL = EMBEDDED_MODEL_NAME
INTERVAL = 4
STORY = "Write a long story about a dragon who guards a pagoda."


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    srv = start_server(str(tmp_path_factory.mktemp("interval")), "--stream-interval", str(INTERVAL),
                       "--num-tokenizers", "1", "--max-model-len", "512")
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    srv.stop()


def ids_of(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def streamed_completion(client: openai.OpenAI, max_tokens: int) -> tuple[str, list[list[int]], str | None]:
    """The text, each chunk's token ids, and the finish reason of a streamed greedy completion."""
    chunks = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=max_tokens, temperature=0, stream=True, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    text, groups, finish = "", [], None
    for chunk in chunks:
        choice = chunk.choices[0]
        text += choice.text
        groups.append(ids_of(choice.logprobs.tokens))
        finish = choice.finish_reason or finish
    return text, groups, finish


def test_completion_chunks_carry_n_tokens_and_the_same_text_and_ids(grouped, client):
    text, groups, finish = streamed_completion(grouped, 17)
    assert [len(g) for g in groups] == [1, 4, 4, 4, 4] and finish == "length"
    ref_text, ref_groups, ref_finish = streamed_completion(client, 17)  # the session server: N = 1
    assert len(ref_groups) == 17 and ref_finish == "length"
    assert (text, sum(groups, [])) == (ref_text, sum(ref_groups, []))
    whole = grouped.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=17, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    ).choices[0]
    assert (whole.text, ids_of(whole.logprobs.tokens)) == (text, sum(groups, []))


def test_each_chat_sample_is_grouped_on_its_own(grouped):
    kw = {"model": MODEL, "messages": [{"role": "user", "content": STORY}], "max_tokens": 10, "n": 2,
          "temperature": 0.8, "seed": 11, "extra_body": {"ignore_eos": True}}
    counts: dict[int, list[int]] = {0: [], 1: []}
    texts = {0: "", 1: ""}
    roles = 0
    for chunk in grouped.chat.completions.create(stream=True, logprobs=True, **kw):
        for choice in chunk.choices:
            if choice.delta.role:
                roles += 1
                continue
            texts[choice.index] += choice.delta.content or ""
            counts[choice.index].append(len(choice.logprobs.content) if choice.logprobs else 0)
    assert roles == 2
    assert counts[0][:3] == counts[1][:3] == [1, 4, 4] and sum(counts[0]) == sum(counts[1]) == 10
    whole = grouped.chat.completions.create(**kw)
    assert [texts[i] for i in range(2)] == [c.message.content for c in whole.choices]


def test_responses_deltas_are_grouped_too(grouped):
    kw = {"model": MODEL, "input": STORY, "max_output_tokens": 9, "temperature": 0}
    whole = grouped.responses.create(**kw)
    events = list(grouped.responses.create(stream=True, **kw))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert whole.usage.output_tokens == 9 and events[-1].response.usage.output_tokens == 9
    assert 2 <= len(deltas) <= 3 and "".join(deltas) == whole.output_text  # tokens 1 | 2-5 | 6-9


def test_an_interval_below_one_is_refused_at_start():
    proc = subprocess.run([sys.executable, "-m", "pagoda", "serve", "--stream-interval", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--stream-interval must be at least 1" in proc.stderr
