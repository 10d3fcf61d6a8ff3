"""Concurrent streams through the real server, for the tests that disturb it mid-load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import openai

from protocol import EMBEDDED_MODEL_NAME
from tests.conftest import Server, child_pids

NUM_STREAMS = 8
MAX_TOKENS = 48
QUESTIONS = [
    "Tell me about the sea.", "What is a pagoda?", "Name three colors.", "Why is the sky blue?",
    "Write about autumn.", "Describe a cat.", "What do bees do?", "Explain rain.",
]
# Greedy, but one stream is seeded random sampling and one holds text back for a stop string
# that never comes (whoever rebuilds its text must hold back the same characters).
SAMPLING = [{"temperature": 0}] * 6 + [{"temperature": 1.0, "seed": 7}, {"temperature": 0, "stop": ["zq\nzq"]}]


def member_pid(server: Server, role: str, member_id: str | None = None) -> int:
    """The pid of one member process of `server` (`role` and, for a tokenizer, its id)."""
    for pid in child_pids(server.proc.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode().split("\0")
        if role in args and (member_id is None or member_id in args):
            return pid
    raise AssertionError(f"no {role} {member_id or ''} process")


async def _stream(
    client: openai.AsyncOpenAI, question: str, sampling: dict, first_text: asyncio.Event
) -> tuple[str, list[float]]:
    """The streamed answer's text, and when each piece of it arrived."""
    chunks = await client.chat.completions.create(
        model=EMBEDDED_MODEL_NAME, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
        stream=True, extra_body={"ignore_eos": True}, **sampling,
    )
    text, times = [], []
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
            times.append(time.monotonic())
            first_text.set()
    return "".join(text), times


async def run_streams(
    server: Server, disturb: Callable[[], Awaitable[None]] | None = None
) -> tuple[list[str], float]:
    """NUM_STREAMS concurrent streams; once every one has text, `disturb()` runs.

    Returns the texts and the recovery time: from the disturbance to the first text after it
    of the stream that waited longest (0 without one).
    """
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    started = [asyncio.Event() for _ in range(NUM_STREAMS)]
    tasks = [asyncio.create_task(_stream(client, *args)) for args in zip(QUESTIONS, SAMPLING, started)]
    disturbed_at = None
    if disturb is not None:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        disturbed_at = time.monotonic()
        await disturb()
    results = await asyncio.gather(*tasks)
    await client.close()
    texts = [text for text, _ in results]
    if disturbed_at is None:
        return texts, 0.0
    resumed = [min((t for t in times if t > disturbed_at), default=disturbed_at) for _, times in results]
    return texts, max(resumed) - disturbed_at


def greedy_chat_streams(
    server: Server, chats: list[list[dict]], max_tokens: int, kill_role: str | None = None, under_way: int = 8
) -> list[str]:
    """Each chat streamed at once, greedy; with `kill_role`, that member is SIGKILLed once every
    stream has received `under_way` pieces of text. The streams' texts, in order."""

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        started = [asyncio.Event() for _ in chats]

        async def stream(i: int) -> str:
            chunks = await client.chat.completions.create(
                model=EMBEDDED_MODEL_NAME, messages=chats[i], temperature=0, max_tokens=max_tokens, stream=True)
            text = []
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
                    if len(text) >= under_way:
                        started[i].set()
            return "".join(text)

        tasks = [asyncio.create_task(stream(i)) for i in range(len(chats))]
        if kill_role is not None:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            os.kill(member_pid(server, kill_role), signal.SIGKILL)
        texts = await asyncio.gather(*tasks)
        await client.close()
        return texts

    return asyncio.run(run())
