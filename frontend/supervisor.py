"""`pagoda serve`: start every process, wait until all are ready, stop them all on a signal.

Each child is a separate OS process (`python -m frontend.cli <role>`, its configuration in
`$PAGODA_ENGINE_CONFIG`), so
the very same processes run under docker compose or Kubernetes. The children are told by the
kernel (PR_SET_PDEATHSIG) to stop if the supervisor dies, so nothing is ever orphaned.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from protocol import EngineConfig, encode_config

logger = logging.getLogger("pagoda.supervisor")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the supervisor's own signal handling still stops children
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
        cmd = [sys.executable, "-m", "frontend.cli", role, *extra]
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


def _http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return check


class _Stop(Exception):
    pass


def serve(config: EngineConfig) -> int:
    """Run the whole server until SIGINT or SIGTERM; the exit status of `pagoda serve`."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s [supervisor] %(message)s",
                        datefmt="%H:%M:%S")
    config = config.with_addresses()
    group = ProcessGroup(config)

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        group.start()
        logger.info("started %s", ", ".join(f"{n} (pid {p})" for n, p in group.pids().items()))
        base = f"http://{config.host}:{config.port}"
        group.wait_until(_http_ready(base + "/ready"), timeout_s=900)
        print(f"Pagoda is serving {config.model_name} at {base}/v1", flush=True)
        while not (dead := group.dead()):
            time.sleep(0.5)
        logger.error("%s exited; stopping every process", ", ".join(dead))
        status = 1
    except _Stop:
        logger.info("stopping")
    except RuntimeError as e:
        logger.error("%s", e)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        group.stop()
    return status
