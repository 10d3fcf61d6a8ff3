"""Workload F: kill -9 a member of a running server under load, and lose nothing.

The same streams run three times against one server: `cold` (the prompts new to it),
`warm` (undisturbed again, the prompts now in its prefix cache) and `killed` (as `warm`, and
once every stream has `kill_after` tokens, the member gets SIGKILL). Every stream must
complete, and its text is compared with the `warm` run's, the undisturbed run made under the
same conditions (`cold` against `warm` says how much of a difference, if any, is the numerics
of a different batch and a cached prefix rather than the kill).

Recovery: from the kill to the end of the longest stall of the stream that waited longest, and
the steps between, from the server's log as it is written (each line stamped when it is seen):
the member restarted, its imports and device set up (loading), its model loaded, the KV cache
sized, kernels warmed up, CUDA graphs captured, its hello to the scheduler, then the re-prefill
of every running request.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.serve import auth_headers
from bench.workloads import Req

# The server log's lines that mark a restarted worker's way back, in the order they come.
MILESTONES = {
    "restarted": r"worker-0 restarted \(pid",
    "loading": r"\[worker-0\].* loading ",
    "model_loaded": r"\[worker-0\].* loaded ",
    "kv_sized": r"\[worker-0\].* KV cache",
    "kernels_ready": r"\[worker-0\].* attention kernels: ",
    "graphs_captured": r"\[worker-0\].* captured .* CUDA graphs",
    "worker_ready": r"\[worker-0\].* ready: \d+ KV blocks",
    "joined": r"worker worker-0 \(rank 0, pid \d+\) joined",
}


@dataclass
class Stream:
    text: str = ""
    token_times: list[float] = field(default_factory=list)
    error: str = ""


class LogWatcher(threading.Thread):
    """Tails a log file; each line is stamped (time.monotonic()) when first seen."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()

    def run(self) -> None:
        with open(self.path, errors="replace") as f:
            partial = ""
            while not self._stop.is_set():
                chunk = f.read()
                if not chunk:
                    time.sleep(0.02)
                    continue
                now = time.monotonic()
                partial += chunk
                *done, partial = partial.split("\n")
                self.lines.extend((now, line) for line in done)

    def stop(self) -> None:
        self._stop.set()

    def first_after(self, t0: float, pattern: str) -> float | None:
        rx = re.compile(pattern)
        return next((t - t0 for t, line in list(self.lines) if t >= t0 and rx.search(line)), None)


def sampling_of(i: int) -> dict[str, Any]:
    """Greedy, but one stream in eight is seeded random sampling (the scheduler keeps each
    request's seed and how many tokens it sampled, so a replay draws the same numbers)."""
    return {"temperature": 1.0, "seed": 1000 + i} if i % 8 == 7 else {"temperature": 0}


async def _stream(client: httpx.AsyncClient, url: str, model: str, i: int, req: Req, out: Stream,
                  counted: asyncio.Event, kill_after: int) -> None:
    body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_len, "ignore_eos": True,
            "stream": True, **sampling_of(i)}
    pieces: list[str] = []
    done = False
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                done = done or line == "data: [DONE]"
                if not line.startswith("data: ") or done:
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = f"stream error: {chunk['error']}"
                    return
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    pieces.append(chunk["choices"][0]["text"])
                    out.token_times.append(time.monotonic())
                    if len(out.token_times) >= kill_after:
                        counted.set()
            if not done:
                out.error = "stream cut without [DONE]"
    except httpx.HTTPError as e:
        out.error = repr(e)
    finally:
        out.text = "".join(pieces)
        counted.set()


async def run_streams(base_url: str, model: str, reqs: list[Req], kill_pid: int | None = None,
                      kill_after: int = 16) -> tuple[list[Stream], float, float | None, float]:
    """All of `reqs` at once; with `kill_pid`, SIGKILL it once every stream has `kill_after`
    tokens. Returns the streams, and when (time.monotonic()) they started, the kill happened and
    the last one ended."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    streams = [Stream() for _ in reqs]
    counted = [asyncio.Event() for _ in reqs]
    killed_at = None
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, headers=auth_headers()) as client:
        url = base_url + "/v1/completions"
        tasks = [asyncio.create_task(_stream(client, url, model, i, req, s, e, kill_after))
                 for i, (req, s, e) in enumerate(zip(reqs, streams, counted, strict=True))]
        if kill_pid is not None:
            await asyncio.gather(*(e.wait() for e in counted))
            killed_at = time.monotonic()
            os.kill(kill_pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    return streams, start, killed_at, time.monotonic()


def member_pid(root: int, role: str) -> int:
    """The pid of the descendant of `root` whose command line names `role` (e.g. worker)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    family, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in family} - family
        family |= new
        grew = bool(new)
    for pid in sorted(family - {root}):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if role in f.read().decode().split("\0"):
                    return pid
        except OSError:
            continue
    raise SystemExit(f"no {role} process under pid {root}")


def _compare(runs: list[Stream], ref: list[Stream]) -> dict[str, Any]:
    same = [a.text == b.text for a, b in zip(runs, ref, strict=True)]
    differing = [i for i, s in enumerate(same) if not s]
    first_diff = []
    for i in differing[:10]:
        a, b = runs[i].text, ref[i].text
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        first_diff.append({"stream": i, "seeded": i % 8 == 7, "char": k, "of": len(b)})
    return {"identical": sum(same), "differing": differing, "first_differences": first_diff}


def run_faults(base_url: str, model: str, reqs: list[Req], root_pid: int, log: LogWatcher,
               kill: str, kill_after: int) -> dict[str, Any]:
    out: dict[str, Any] = {"num_requests": len(reqs), "kill": kill, "kill_after_tokens": kill_after,
                           "output_tokens_requested": sum(r.output_len for r in reqs)}
    runs = {}
    for name in ("cold", "warm", "killed"):
        pid = member_pid(root_pid, kill) if name == "killed" else None
        streams, start, killed_at, end = asyncio.run(run_streams(base_url, model, reqs, pid, kill_after))
        elapsed = end - start
        runs[name] = streams
        failed = [s.error for s in streams if s.error]
        out[name] = {"elapsed_s": elapsed, "completed": len(streams) - len(failed), "lost": len(failed),
                     "errors": sorted(set(failed))[:5]}
        print(f"{name}: {len(streams) - len(failed)}/{len(streams)} completed in {elapsed:.1f} s", flush=True)
        if killed_at is not None:
            # A stream's stall: the longest gap between its tokens from the kill on (tokens
            # already on their way still arrive just after it); it resumed at the gap's end.
            resumed = []
            for st in streams:
                times = [killed_at] + [t for t in st.token_times if t > killed_at]
                gaps = [(b - a, b) for a, b in zip(times, times[1:])]
                resumed.append(max(gaps)[1] - killed_at if gaps else 0.0)
            out[name]["killed_pid"] = pid
            out[name]["recovery_s"] = max(resumed)
            out[name]["resumed_s"] = {"min": min(resumed), "max": max(resumed)}
            steps = {k: log.first_after(killed_at, rx) for k, rx in MILESTONES.items()}
            out[name]["milestones_s"] = steps
            if steps["joined"] is not None:
                # From the hello to the last stream's next token: every running request's
                # prompt and outputs so far prefilled again, then one step. (A log line is
                # stamped up to a poll, 20 ms, late.)
                out[name]["re_prefill_s"] = max(0.0, max(resumed) - steps["joined"])
            out[name]["kill_at_s"] = killed_at - start
            out[name]["after_kill_s"] = end - killed_at
    out["cold_vs_warm"] = _compare(runs["cold"], runs["warm"])
    out["killed_vs_warm"] = _compare(runs["killed"], runs["warm"])
    out["lost"] = out["killed"]["lost"]
    return out
