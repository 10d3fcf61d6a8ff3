"""Soak: many requests of mixed lengths with random cancels against a real `pagoda serve`.

Starts `pagoda serve` with the arguments after `--`, runs a warm-up batch, notes each member's
resident memory, then runs `--requests` more in `--rounds`, noting it after each round:
completions by token ids and chats, streamed or not, n of 1 or 2, `max_tokens` from 1 to
`--max-tokens` with `ignore_eos`. A `--cancel` fraction of them is abandoned by its client
midway (a stream closed after a few chunks, or a whole answer given up on after a short
timeout). Then it waits for the server to be idle and checks that nothing is left: every
request that was not cancelled completed with all its tokens, the KV cache usage and the
scheduler's running and waiting requests are back to 0, no tokenizer has a request in flight,
no member was restarted. It prints the figures (memory of each member before and after,
duration, requests, cancels) as JSON, also to `--json`, and exits 1 when a check failed.

    python scripts/soak.py --requests 3000 --concurrency 32 -- --max-model-len 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

# Token ids every vocabulary of interest has as plain byte tokens (past the special ones).
PROMPT_IDS = range(20, 256)
WORDS = "the a lighthouse keeper named Ann watched ships pass in storm and calm every night".split()


@dataclass
class Outcome:
    cancelled: int = 0
    completed: int = 0
    failed: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, each with its `pagoda <role>` (and member id)."""
    members = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and "pagoda" in args:
            role = args[args.index("pagoda") + 1]
            if "--member-id" in args:
                role = args[args.index("--member-id") + 1]
            elif "--rank" in args:
                role = f"worker-{args[args.index('--rank') + 1]}"
            members[int(entry)] = role
    return members


def rss_mib(pid: int) -> float:
    """Resident memory, from /proc/<pid>/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as f:
        match = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) / 1024 if match else 0.0


def metrics(base_url: str) -> tuple[dict[str, float], dict[str, float]]:
    """The single-series metrics from /metrics by name, and `requests_held` by process."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    values = {m.group(1): float(m.group(2))
              for m in re.finditer(r'^pagoda:(\w+)\{model_name="[^"]*"\} (\S+)$', text, re.M)}
    held = {m.group(1): float(m.group(2))
            for m in re.finditer(r'^pagoda:requests_held\{.*process="([^"]*)"\} (\S+)$', text, re.M)}
    return values, held


class Soak:
    def __init__(self, base_url: str, args: argparse.Namespace) -> None:
        self.base_url = base_url
        self.args = args
        self.rng = random.Random(args.seed)
        self.outcome = Outcome()

    def _request(self) -> tuple[str, dict[str, Any], bool]:
        """(path, body, cancel) of one random request."""
        rng, a = self.rng, self.args
        body: dict[str, Any] = {
            "max_tokens": rng.randint(1, a.max_tokens),
            "ignore_eos": True,
            "temperature": rng.choice([0, 0, 1]),
            "n": 2 if rng.random() < 0.1 else 1,
            "stream": rng.random() < 0.5,
        }
        if rng.random() < 0.7:
            # Mixed lengths: mostly short prompts, some up to --max-prompt tokens.
            length = rng.randint(1, a.max_prompt if rng.random() < 0.2 else max(1, a.max_prompt // 8))
            path, body["prompt"] = "/v1/completions", [rng.choice(PROMPT_IDS) for _ in range(length)]
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
        return path, body, rng.random() < a.cancel

    async def _one(self, client: httpx.AsyncClient, path: str, body: dict[str, Any], cancel: bool) -> None:
        want = body["max_tokens"] * body["n"]
        if cancel and body["stream"]:
            # The client leaves after a few chunks: closing the stream drops the connection.
            leave_after = self.rng.randint(1, max(1, want // 2))
            async with client.stream("POST", self.base_url + path, json=body) as resp:
                chunks = 0
                async for line in resp.aiter_lines():
                    chunks += line.startswith("data: {")
                    if chunks >= leave_after:
                        break
            self.outcome.cancelled += 1
            return
        if cancel:
            # The client gives up on the whole answer after a short wait (it may come first).
            try:
                await client.post(self.base_url + path, json=body, timeout=self.rng.uniform(0.01, 0.3))
            except httpx.TimeoutException:
                pass
            self.outcome.cancelled += 1
            return
        got = await (self._streamed(client, path, body) if body["stream"] else self._whole(client, path, body))
        if got == want:
            self.outcome.completed += 1
        else:
            self.outcome.failed.append(f"{path} {json.dumps(body)[:200]}: {got} of {want} tokens")

    async def _whole(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> int | str:
        resp = await client.post(self.base_url + path, json=body)
        if resp.status_code != 200:
            return f"status {resp.status_code} {resp.text[:200]}"
        return resp.json()["usage"]["completion_tokens"]

    async def _streamed(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> int | str:
        body = {**body, "stream_options": {"include_usage": True}}
        tokens: int | str = "no usage chunk"
        done = False
        async with client.stream("POST", self.base_url + path, json=body) as resp:
            if resp.status_code != 200:
                return f"status {resp.status_code} {(await resp.aread())[:200]!r}"
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                    tokens = usage["completion_tokens"]
        return tokens if done else "no [DONE]"

    async def run(self, count: int) -> None:
        limits = httpx.Limits(max_connections=self.args.concurrency * 2)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            sem = asyncio.Semaphore(self.args.concurrency)

            async def bounded() -> None:
                async with sem:
                    path, body, cancel = self._request()
                    try:
                        await self._one(client, path, body, cancel)
                    except Exception as e:  # a failure to report, not to stop the soak
                        self.outcome.failed.append(f"{path} {json.dumps(body)[:200]}: {type(e).__name__} {e}")

            await asyncio.gather(*(bounded() for _ in range(count)))


def wait_idle(base_url: str, timeout: float) -> dict[str, Any]:
    """Poll until the scheduler runs nothing and holds no KV block, and no process holds any
    request's state (the frontend, each tokenizer by its own count, the scheduler); the last
    figures either way."""
    deadline = time.monotonic() + timeout
    while True:
        m, held = metrics(base_url)
        health = httpx.get(base_url + "/health", timeout=10).json()
        state = {
            "kv_cache_usage_perc": m.get("kv_cache_usage_perc"),
            "num_requests_running": m.get("num_requests_running"),
            "num_requests_waiting": m.get("num_requests_waiting"),
            "requests_held": held,
            # The frontend's count of each tokenizer's requests in flight.
            "tokenizer_in_flight": {name: t["requests"] for name, t in health["tokenizers"].items()},
        }
        idle = (state["kv_cache_usage_perc"] == 0 and state["num_requests_running"] == 0
                and state["num_requests_waiting"] == 0 and "scheduler" in held and not any(held.values())
                and not any(state["tokenizer_in_flight"].values()))
        if idle or time.monotonic() > deadline:
            return {**state, "idle": idle}
        time.sleep(0.2)


def start_server(serve_args: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pagoda", "serve", "--port", str(port), *serve_args],
                                stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"pagoda serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(base_url + "/ready", timeout=2).status_code == 200:
                return proc, base_url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit(f"pagoda serve not ready after 600 s; see {log_path}")
        time.sleep(0.3)


def soak(args: argparse.Namespace, serve_args: list[str]) -> dict[str, Any]:
    log_path = args.log or os.path.join(tempfile.mkdtemp(prefix="pagoda-soak-"), "server.log")
    proc, base_url = start_server(serve_args, log_path)
    try:
        members = _children(proc.pid)
        rss_start = {role: rss_mib(pid) for pid, role in members.items()}
        driver = Soak(base_url, args)
        asyncio.run(driver.run(args.warmup))
        warm = wait_idle(base_url, args.idle_timeout)
        rss_warm = {role: rss_mib(pid) for pid, role in members.items()}
        driver.outcome = Outcome()
        started = time.monotonic()
        # In rounds, the memory noted after each: a leak grows round after round, a cache
        # that fills up after the warm-up does not.
        rss_rounds: dict[str, list[float]] = {role: [] for role in members.values()}
        for r in range(args.rounds):
            asyncio.run(driver.run(args.requests * (r + 1) // args.rounds - args.requests * r // args.rounds))
            final = wait_idle(base_url, args.idle_timeout)
            for pid, role in members.items():
                rss_rounds[role].append(round(rss_mib(pid), 1))
        duration = time.monotonic() - started
        rss_end = {role: rss_mib(pid) for pid, role in members.items()}
        report = {
            "requests": args.requests,
            "warmup_requests": args.warmup,
            "concurrency": args.concurrency,
            "duration_s": round(duration, 1),
            **asdict(driver.outcome),
            "warm_idle": warm["idle"],
            "final": final,
            "rss_mib": {
                role: {"start": round(rss_start[role], 1), "after_warmup": round(rss_warm[role], 1),
                       "rounds": rss_rounds[role], "end": round(rss_end[role], 1)}
                for role in sorted(rss_start)
            },
            "members_restarted": sorted(set(members.items()) ^ set(_children(proc.pid).items())),
            "log": log_path,
        }
        report["ok"] = bool(final["idle"] and not driver.outcome.failed and not report["members_restarted"])
        return report
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200, help="requests before memory is first measured")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--cancel", type=float, default=0.25, help="fraction of requests abandoned midway")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=512, help="the longest prompt, in tokens")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the requests, memory noted after each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--idle-timeout", type=float, default=30.0, help="seconds to wait for the server to be idle")
    parser.add_argument("--log", help="the server's log (default: a temporary file)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    report = soak(args, serve_args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
