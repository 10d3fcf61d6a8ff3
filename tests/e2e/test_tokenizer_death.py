"""A tokenizer killed (SIGKILL) under load: its streams go on through the other tokenizer, and
each client's text is exactly that of an undisturbed run (nothing lost, nothing repeated)."""

from __future__ import annotations

import asyncio
import os
import signal

from tests.conftest import start_server
from tests.e2e.streams import NUM_STREAMS, member_pid, run_streams


def test_killing_a_tokenizer_under_load_loses_and_repeats_nothing(tmp_path):
    server = start_server(str(tmp_path), "--num-tokenizers", "2", "--max-model-len", "512")
    try:
        expected, _ = asyncio.run(run_streams(server))
        assert all(len(t) > 40 for t in expected)
        victim = member_pid(server, "tokenizer", "tokenizer-0")

        async def kill() -> None:
            os.kill(victim, signal.SIGKILL)

        texts, recovery_s = asyncio.run(run_streams(server, kill))
        print(f"\ntokenizer-0 killed under {NUM_STREAMS} streams: all had text again {recovery_s:.2f} s later")
        assert texts == expected
        # The pool is whole again (tokenizer-0 restarted) and serves the same answers.
        again, _ = asyncio.run(run_streams(server))
        assert again == expected
    finally:
        server.stop()
