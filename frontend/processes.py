"""The engine's member processes, started, restarted and stopped together: used by the offline
LLM and by `pagoda serve`.

Each member is a separate OS process (`python -m pagoda <role>`, its configuration in
`$PAGODA_ENGINE_CONFIG`), so the very same processes run under docker compose or Kubernetes.
The kernel stops them (PR_SET_PDEATHSIG) if their parent dies, so nothing is ever orphaned.

Once the engine has been ready, a member that dies is started again (same role, arguments and
environment) after a backoff, and says hello to its hubs again (a restarted scheduler's members
reconnect to it and rejoin); a member that dies too often stops everything (`GaveUp`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import EngineConfig, encode_config
from protocol.messages import draft_worker_id, worker_id

logger = logging.getLogger("pagoda.processes")

_PR_SET_PDEATHSIG = 1

# The restart policy: the first restart waits BACKOFF_START_S, each next one twice as long up
# to BACKOFF_MAX_S; a member that stayed up STABLE_AFTER_S starts over at BACKOFF_START_S.
# More than MAX_RESTARTS restarts of one member within RESTART_WINDOW_S: give up.
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


class GaveUp(RuntimeError):
    """A member died in a way a restart does not fix: every process must stop."""


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the parent's own signal handling still stops its children
        pass


def describe_exit(returncode: int) -> str:
    """'was killed by SIGKILL' or 'exited with status 1'."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass
class _Member:
    role: str
    args: tuple[str, ...]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_s: float = 0.0  # the backoff of its latest restart; 0 before the first
    deaths: deque[float] = field(default_factory=deque)  # deaths that were restarted, within the window
    restart_at: float | None = None  # dead, and due to start again at this time


class ProcessGroup:
    """The child processes of one engine, started, restarted and stopped together."""

    def __init__(self, config: EngineConfig, with_frontend: bool = True) -> None:
        self.config = config
        self.with_frontend = with_frontend
        self.members: dict[str, _Member] = {}
        # Off until the engine was ready once: a death during start-up (a model that cannot
        # load) is the user's to fix, and restarting it would only repeat it.
        self.restarts_enabled = False
        self._stopped = False
        self._lock = threading.Lock()  # the offline LLM supervises from a thread

    def _spawn(self, name: str) -> None:
        member = self.members[name]
        # The configuration goes in the environment, not on the command line: a command line
        # is visible to every user of the machine (`ps`), and it may hold the API key.
        cmd = [sys.executable, "-m", "pagoda", member.role, *member.args]
        env = dict(os.environ, PAGODA_SUPERVISED="1", PAGODA_ENGINE_CONFIG=encode_config(self.config))
        member.proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        member.started_at = time.monotonic()

    def _add(self, name: str, role: str, *args: str) -> None:
        self.members[name] = _Member(role, args)
        self._spawn(name)

    def start(self) -> None:
        self._add("scheduler", "scheduler")
        for group in range(self.config.data_parallel_size):
            for rank in range(self.config.tensor_parallel_size):
                self._add(worker_id(group, rank), "worker", "--group", str(group), "--rank", str(rank))
            spec = self.config.speculative
            if spec is not None and spec.method == "draft_model":  # one draft worker per group
                self._add(draft_worker_id(group), "draft-worker", "--group", str(group))
        for i in range(self.config.num_tokenizers):
            self._add(f"tokenizer-{i}", "tokenizer", "--member-id", f"tokenizer-{i}")
        if self.with_frontend:
            self._add("frontend", "frontend")

    def pids(self) -> dict[str, int]:
        return {name: m.proc.pid for name, m in self.members.items() if m.proc is not None}

    def dead(self) -> list[str]:
        return [name for name, m in self.members.items() if m.proc is not None and m.proc.poll() is not None]

    def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if dead := self.dead():
                raise RuntimeError(f"{', '.join(dead)} exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def supervise(self) -> None:
        """Notice dead members and start each again once its backoff is over; call it often.

        Raises `GaveUp` for a death restarts cannot fix (during start-up, or past the restart
        rate): the caller then stops everything.
        """
        with self._lock:
            if self._stopped:
                return
            now = time.monotonic()
            for name, m in self.members.items():
                assert m.proc is not None
                if m.restart_at is None and m.proc.poll() is not None:
                    self._on_death(name, m, now)
                if m.restart_at is not None and now >= m.restart_at:
                    m.restart_at = None
                    self._spawn(name)
                    logger.info("%s restarted (pid %d)", name, m.proc.pid)

    def _on_death(self, name: str, m: _Member, now: float) -> None:
        assert m.proc is not None
        how = f"{name} (pid {m.proc.pid}) {describe_exit(m.proc.returncode)}"
        if not self.restarts_enabled:
            raise GaveUp(f"{how} during start-up (see the log above); stopping every process")
        while m.deaths and now - m.deaths[0] > RESTART_WINDOW_S:
            m.deaths.popleft()
        if len(m.deaths) >= MAX_RESTARTS:
            raise GaveUp(f"{how}: past the restart rate ({MAX_RESTARTS} restarts within "
                         f"{RESTART_WINDOW_S:.0f} s already); stopping every process")
        up_s = now - m.started_at
        stable = m.backoff_s == 0.0 or up_s >= STABLE_AFTER_S
        m.backoff_s = BACKOFF_START_S if stable else min(2 * m.backoff_s, BACKOFF_MAX_S)
        m.deaths.append(now)
        m.restart_at = now + m.backoff_s
        logger.warning("%s after %.1f s up; restarting it in %.1f s (restart %d within %.0f s)",
                       how, up_s, m.backoff_s, len(m.deaths), RESTART_WINDOW_S)
        if m.role == "worker":
            self._stop_group_of(name)

    def _stop_group_of(self, name: str) -> None:
        """A rank's death is its worker group's: the other ranks shared a process group with
        it and would wait in their next collective (NCCL) or fail in it (gloo). They are
        killed now, and restarted like any dead member, so the whole group says hello again."""
        group = self.members[name].args[1]  # ("--group", G, "--rank", R)
        peers = [m.proc for n, m in self.members.items()
                 if m.role == "worker" and m.args[1] == group and n != name and m.proc is not None
                 and m.proc.poll() is None and m.restart_at is None]
        for proc in peers:
            proc.kill()
        if peers:
            logger.warning("%s died: stopping the other ranks of its worker group (pids %s)",
                           name, ", ".join(str(p.pid) for p in peers))

    def stop(self, timeout_s: float = 10.0, drain_s: float = 0.0) -> None:
        """SIGTERM every child, then SIGKILL whatever is still there after `timeout_s`.

        With `drain_s`, the frontend is stopped first and given that long to drain (refusing
        new requests while the running ones finish), with the rest still serving it.
        """
        with self._lock:
            self._stopped = True
            frontend = self.members.get("frontend")
            if drain_s > 0 and frontend is not None and frontend.proc is not None:
                self._terminate([frontend.proc], drain_s + 5.0)  # + its own shutdown after the drain
            self._terminate([m.proc for m in self.members.values() if m.proc is not None], timeout_s)
            shutil.rmtree(self.config.run_dir, ignore_errors=True)

    @staticmethod
    def _terminate(procs: list[subprocess.Popen], timeout_s: float) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
