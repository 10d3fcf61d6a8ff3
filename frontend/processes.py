"""The engine's member processes, started and stopped together: used by the offline LLM and by `pagoda serve`.

Each member is a separate OS process (`python -m pagoda <role>`, its configuration in
`$PAGODA_ENGINE_CONFIG`), so the very same processes run under docker compose or Kubernetes.
The kernel stops them (PR_SET_PDEATHSIG) if their parent dies, so nothing is ever orphaned.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from protocol import EngineConfig, encode_config

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the parent's own signal handling still stops its children
        pass


class ProcessGroup:
    """The child processes of one engine, started and stopped together."""

    def __init__(self, config: EngineConfig, with_frontend: bool = True) -> None:
        self.config = config
        self.with_frontend = with_frontend
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, role: str, *extra: str) -> None:
        # The configuration goes in the environment, not on the command line: a command line
        # is visible to every user of the machine (`ps`), and it may hold the API key.
        cmd = [sys.executable, "-m", "pagoda", role, *extra]
        env = dict(os.environ, PAGODA_SUPERVISED="1", PAGODA_ENGINE_CONFIG=encode_config(self.config))
        self.procs[name] = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)

    def start(self) -> None:
        self._spawn("scheduler", "scheduler")
        for rank in range(self.config.tensor_parallel_size):
            self._spawn(f"worker-{rank}", "worker", "--rank", str(rank))
        for i in range(self.config.num_tokenizers):
            self._spawn(f"tokenizer-{i}", "tokenizer", "--member-id", f"tokenizer-{i}")
        if self.with_frontend:
            self._spawn("frontend", "frontend")

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if dead := self.dead():
                raise RuntimeError(f"{', '.join(dead)} exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every child, then SIGKILL whatever is still there after `timeout_s`."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.config.run_dir, ignore_errors=True)
