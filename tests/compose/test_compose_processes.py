"""compose/compose.yaml's services run as plain processes: each service's command and
environment read from the file (tests/compose/services.py), its host names mapped to 127.0.0.1,
over tcp:// with CURVE keys from `pagoda keys generate` and the API key from a file.

3 tokenizer replicas and 2 worker groups (the `worker-cpu` service, the second one with
`--group 1`) on a tiny model serve concurrent streams; mid-load a 4th tokenizer and a 3rd group
join, then one tokenizer and one group are killed: every stream ends with the text it has
undisturbed, and the members that joined take work.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.compose.services import service_process
from tests.conftest import free_port

API_KEY = "compose-test-key"
MODEL = "tiny-compose"
NUM_STREAMS = 12
MAX_TOKENS = 40
LONG_TOKENS = 200


class Deployment:
    """The services of compose.yaml as processes, on remapped ports."""

    def __init__(self, tmp_path: Path, model: Path) -> None:
        self.tmp_path = tmp_path
        keys = tmp_path / "keys"
        subprocess.run([sys.executable, "-m", "pagoda", "keys", "generate", str(keys)], check=True,
                       capture_output=True)
        (keys / "api_key").write_text(API_KEY + "\n")
        self.http_port = free_port()
        self.ports = {8000: self.http_port, 5556: free_port(), 5557: free_port()}
        self.env = {"PAGODA_KEYS_DIR": str(keys), "PAGODA_MODEL": str(model), "PAGODA_SERVED_MODEL_NAME": MODEL,
                    "PAGODA_MAX_MODEL_LEN": "256", "PAGODA_NUM_TOKENIZERS": "3", "PAGODA_LOG_LEVEL": "info"}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, service: str, replica: int = 1, extra: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> subprocess.Popen:
        sp = service_process(service, self.env, ports=self.ports, replica=replica,
                             pagoda=[sys.executable, "-m", "pagoda"])
        # What a container would hold: the file's environment only, plus what runs Python here.
        base = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "TMPDIR") if k in os.environ}
        log = open(self.tmp_path / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen([*sp.argv, *extra], env={**base, **sp.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def health(self) -> dict:
        try:
            r = httpx.get(self.base_url + "/health", timeout=2)
        except httpx.HTTPError:
            return {}
        return r.json() if r.status_code == 200 else {}

    def wait(self, what: str, check, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while not (value := check()):
            for name, p in self.procs.items():
                assert p.poll() is None or name.startswith("gone-"), f"{name} exited:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
            time.sleep(0.1)
        return value

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


async def _streams(base_url: str, n: int, texts: list[str], progress: list[int], max_tokens: int = MAX_TOKENS) -> None:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    async def one(i: int) -> None:
        resp = await client.completions.create(
            model=MODEL, prompt=f"Here is a story about a lighthouse keeper, part {i}:", max_tokens=max_tokens,
            temperature=0, stream=True, extra_body={"ignore_eos": True},
        )
        async for chunk in resp:
            if chunk.choices and chunk.choices[0].text:
                texts[i] += chunk.choices[0].text
                progress[i] += 1

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()


def _steps_by_group(path: Path) -> list[int]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line)["group"] for line in f if line.strip()]


def _groups_serving(d: Deployment) -> list[int]:
    """The worker groups the engine view shows serving (its first event that has any)."""
    try:
        with httpx.stream("GET", d.base_url + "/engine/stream", timeout=5,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            if r.status_code != 200:
                return []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    groups = json.loads(line[len("data: "):])["members"]["worker_groups"]
                    return sorted(g["group"] for g in groups if g["state"] == "serving")
    except httpx.HTTPError:
        pass
    return []


def _start_all(d: Deployment) -> Path:
    """Scheduler, frontend, worker groups 0 and 1 (the `worker-cpu` service) and 3 tokenizer
    replicas; the scheduler's step log."""
    step_log = d.tmp_path / "steps.jsonl"
    d.start("scheduler", "scheduler", env={"PAGODA_STEP_LOG": str(step_log)})
    d.start("frontend", "frontend")
    d.start("worker-g0", "worker-cpu")
    d.start("worker-g1", "worker-cpu", extra=("--group", "1"))
    for replica in (1, 2, 3):
        d.start(f"tokenizer-{replica}", "tokenizer", replica=replica)
    return step_log


@pytest.fixture
def deployment(tiny, tmp_path):
    folder, _ = tiny("llama")
    d = Deployment(tmp_path, folder)
    yield d
    d.stop()


def test_compose_services_over_curve_scale_tokenizers_and_worker_groups_mid_load_and_lose_nothing(deployment):
    d = deployment
    step_log = _start_all(d)
    d.wait("/health 200 with 3 tokenizers", lambda: len(d.health().get("tokenizers", {})) == 3)
    # Both groups up before the streams (a slow start of one once left all of them to the other).
    d.wait("worker groups 0 and 1 serving", lambda: _groups_serving(d) == [0, 1])
    assert httpx.get(d.base_url + "/v1/models", timeout=5).status_code == 401  # the key is required

    undisturbed = [""] * NUM_STREAMS
    asyncio.run(_streams(d.base_url, NUM_STREAMS, undisturbed, [0] * NUM_STREAMS))
    assert all(undisturbed) and {0, 1} <= set(_steps_by_group(step_log))

    texts, progress = [""] * NUM_STREAMS, [0] * NUM_STREAMS

    async def disturbed() -> None:
        run = asyncio.create_task(_streams(d.base_url, NUM_STREAMS, texts, progress))
        while min(progress) < 4:
            await asyncio.sleep(0.01)
        # Joining mid-load: a 4th tokenizer and a 3rd worker group.
        d.start("tokenizer-4", "tokenizer", replica=4)
        d.start("worker-g2", "worker-cpu", extra=("--group", "2"))
        # Leaving mid-load: a tokenizer and a worker group, killed.
        os.kill(d.procs["tokenizer-1"].pid, signal.SIGKILL)
        os.kill(d.procs["worker-g1"].pid, signal.SIGKILL)
        d.procs["gone-tokenizer-1"] = d.procs.pop("tokenizer-1")
        d.procs["gone-worker-g1"] = d.procs.pop("worker-g1")
        await run

    asyncio.run(disturbed())
    assert texts == undisturbed
    # The group that joined takes work, and so does the tokenizer.
    d.wait("group 2 joined", lambda: "worker worker-g2-0 (rank 0" in d.log("scheduler"))
    d.wait("tokenizer 4 ready", lambda: any(t["ready"] and "tokenizer-4" in name
                                            for name, t in d.health().get("tokenizers", {}).items()))
    before = len(_steps_by_group(step_log))
    seen: set[str] = set()

    async def load_and_watch() -> None:
        run = asyncio.create_task(_streams(d.base_url, NUM_STREAMS, [""] * NUM_STREAMS, [0] * NUM_STREAMS))
        while not run.done():
            seen.update(name for name, t in d.health().get("tokenizers", {}).items() if t["requests"])
            await asyncio.sleep(0.02)
        await run

    asyncio.run(load_and_watch())
    assert 2 in _steps_by_group(step_log)[before:]
    assert any("tokenizer-4" in name for name in seen), seen


def test_a_worker_group_stopped_on_its_own_drains_its_streams_then_exits_0(deployment):
    d = deployment
    step_log = _start_all(d)
    d.wait("/health 200", lambda: len(d.health().get("tokenizers", {})) == 3)
    # Long streams, so that group 1 still runs its share when SIGTERM comes.
    undisturbed = [""] * NUM_STREAMS
    asyncio.run(_streams(d.base_url, NUM_STREAMS, undisturbed, [0] * NUM_STREAMS, LONG_TOKENS))

    texts, progress = [""] * NUM_STREAMS, [0] * NUM_STREAMS
    group1 = d.procs["worker-g1"]

    async def stopped_mid_load() -> None:
        run = asyncio.create_task(_streams(d.base_url, NUM_STREAMS, texts, progress, LONG_TOKENS))
        while min(progress) < 4:
            await asyncio.sleep(0.01)
        group1.send_signal(signal.SIGTERM)  # `docker compose stop worker-1`
        await run

    asyncio.run(stopped_mid_load())
    assert texts == undisturbed
    d.procs["gone-worker-g1"] = d.procs.pop("worker-g1")
    assert group1.wait(30) == 0
    assert "worker-g1-0: SIGTERM: draining" in d.log("worker-g1")
    scheduler_log = d.log("scheduler")
    # It was running streams when SIGTERM came, and ended them itself.
    assert re.search(r"worker group 1 drains \(worker-g1-0 got SIGTERM\): no new request; [1-9]\d* running",
                     scheduler_log)
    # It ended what it ran: nothing was left to move when it stopped.
    assert "lost the worker group 1 (drained): 0 running requests" in scheduler_log
    # Group 0 serves on alone.
    before = len(_steps_by_group(step_log))
    asyncio.run(_streams(d.base_url, NUM_STREAMS, [""] * NUM_STREAMS, [0] * NUM_STREAMS))
    assert set(_steps_by_group(step_log)[before:]) == {0}
