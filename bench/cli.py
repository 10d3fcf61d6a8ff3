"""`pagoda bench {throughput,latency,serve,prefix,kernels,faults}`: one workload of docs/BENCHMARKS.md per run.

Every run measures the machine first (copy bandwidth, matrix rate), runs Pagoda, optionally
the `transformers` peer on the same weights (`--peer hf`), and prints each figure with its
ratio to the peer and to the physical limit. `--output-json` keeps everything, with the
configuration, GPU, versions and git commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

WORKLOADS = ("throughput", "latency", "serve", "prefix", "kernels", "faults")


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`bench` and one subparser per workload, under `sub` (the `pagoda` command's subparsers)."""
    bench = sub.add_parser("bench", help="benchmarks (the workloads of docs/BENCHMARKS.md)")
    wsub = bench.add_subparsers(dest="workload", required=True)
    for name in WORKLOADS:
        p = wsub.add_parser(name)
        p.add_argument("--model", help="a model folder, hub id or GGUF file (default: the embedded "
                                        "SmolLM2-135M-Instruct GGUF, as `pagoda serve` serves)")
        p.add_argument("--random-weights", metavar="SHAPE",
                       help="qwen3-0.6b, llama3-8b, tiny-llama, or llama3-70b (config only: its weights are "
                            "made at load, --load-format dummy; no peer)")
        p.add_argument("--weights-dir", default=os.path.join(tempfile.gettempdir(), "pagoda-bench-weights"))
        p.add_argument("--device", default="auto")
        peers = ["none", "hf", "hf-static", "hf-continuous"]
        if name == "latency":
            peers += ["llama.cpp", "hf+llama.cpp"]
        p.add_argument("--peer", choices=peers, default="none",
                       help="hf: transformers' static generate and generate_batch (throughput; serve: "
                            "offline, on the all-at-once requests) or generate (latency); hf-static / "
                            "hf-continuous: only one of the two; llama.cpp (latency, GGUF models, needs "
                            "llama-cpp-python): llama.cpp on the same file, with as many threads as cores")
        p.add_argument("--output-json")
        p.add_argument("--plot", metavar="DIR", help="write PNG plots here")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--engine-args", default="", help="extra `pagoda serve` flags, one string")
        if name in ("throughput", "latency", "serve"):
            p.add_argument("--speculative-config", metavar="JSON",
                           help="vLLM's speculative_config, e.g. '{\"method\": \"ngram\", "
                                "\"num_speculative_tokens\": 4}' (latency and throughput: a run without it "
                                "and one with it, same prompts)")
        if name == "latency":
            p.add_argument("--prompts", choices=["random", "copy"], default="random",
                           help="copy: chats that ask to repeat a passage given in the prompt (a copy-heavy "
                                "workload for speculative decoding), each alone, up to --output-len tokens")
        if name in ("throughput", "serve", "prefix", "faults"):
            p.add_argument("--num-prompts", type=int,
                           default={"throughput": 256, "serve": 400, "prefix": 64, "faults": 256}[name])
        if name in ("throughput", "latency", "serve", "faults"):
            p.add_argument("--input-len", type=int, nargs="+", help="N, or MIN MAX for uniform lengths",
                           default={"throughput": [100, 1024], "latency": [512], "serve": [1024],
                                    "faults": [256]}[name])
            p.add_argument("--output-len", type=int, nargs="+",
                           default={"throughput": [100, 1024], "latency": [256], "serve": [128],
                                    "faults": [256]}[name])
        if name == "throughput":
            p.add_argument("--max-num-seqs", type=int, nargs="+", default=[256],
                           help="one run per value (throughput against batch size)")
            p.add_argument("--structured-fraction", type=float, default=0.0,
                           help="also run with this share of the requests constrained by a JSON schema "
                                "(bench/workloads.py BENCH_SCHEMA), and measure the TTFT a schema adds")
        if name == "serve":
            p.add_argument("--base-url", help="a running server; else one is started")
            p.add_argument("--request-rate", default="1,4,16,inf", help="comma-separated req/s; inf: all at once")
            p.add_argument("--slo-ttft-ms", type=float, default=2000)
            p.add_argument("--slo-tpot-ms", type=float, default=100)
        if name == "faults":
            p.add_argument("--kill", choices=["worker", "tokenizer", "scheduler"], default="worker",
                           help="the member that gets SIGKILL mid-load")
            p.add_argument("--kill-after", type=int, default=16, help="once every stream has this many tokens")
            p.add_argument("--server-log", help="where the server's output goes (default: a temporary file)")
        if name == "prefix":
            p.add_argument("--prefix-len", type=int, default=2048)
            p.add_argument("--suffix-len", type=int, default=128)
            p.add_argument("--output-len", type=int, default=64)
    return bench


def _lens(v: list[int]) -> tuple[int, int]:
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _device(arg: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if arg == "auto" else arg


def _engine_args(args: argparse.Namespace, device: str, **extra: Any) -> dict[str, Any]:
    from protocol.config import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    ns = p.parse_args(args.engine_args.split())
    cfg = {k: v for k, v in vars(ns).items() if k != "config_json" and v != p.get_default(k)}
    cfg.setdefault("device", device)
    cfg.update(extra)
    return cfg


def _vocab(model: str) -> int:
    from transformers import AutoConfig

    from bench.workloads import pretrained_args

    if model.endswith(".gguf") and os.path.isfile(model):
        # The engine's own reading of the file (the embedding's rows), from its metadata and
        # mapped tensors: transformers' GGUF config reads every tensor (seconds more).
        from gpu_worker.gguf_checkpoint import read_gguf

        return int(read_gguf(model).hf_config["vocab_size"])
    path, kw = pretrained_args(model)
    return AutoConfig.from_pretrained(path, **kw).vocab_size


def _ratio(x: float, ref: float | None) -> float | None:
    return x / ref if ref else None


def _run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Fill `report` as figures come in, so a run cut short still leaves what it measured."""
    from bench import hardware
    from bench.limits import ModelCost
    from bench.shapes import make_random_model
    from bench.workloads import (
        Req,
        random_requests,
        run_hf_continuous,
        run_hf_latency,
        run_hf_static,
        run_llamacpp_latency,
        run_pagoda,
        throughput_limit,
    )

    device = _device(args.device)
    if args.workload != "kernels" and args.random_weights:
        _config_only_shape(args)
    report.update({"workload": args.workload, "args": dict(vars(args)), "env": hardware.describe(device)})
    hw = hardware.measure(device)
    report["hardware"] = hw
    if args.workload == "kernels":
        if device.startswith("cuda"):
            from bench.kernels import run

            report["results"] = run()
        else:
            from bench.kernels_cpu import run_cpu

            report["results"] = run_cpu(hw["copy_bandwidth_bytes_per_s"])
        return
    flags = args.engine_args.replace("=", " ").split()

    def engine_flag(name: str) -> str | None:
        i = flags.index(name) if name in flags else -1
        return flags[i + 1] if 0 <= i < len(flags) - 1 else None

    if args.random_weights:
        # Weights made at load and no peer to share them: nothing but config.json is written.
        dummy = "--load-format" in flags and flags[flags.index("--load-format") + 1] == "dummy"
        weights = False if dummy and args.peer == "none" else None
        model = make_random_model(args.random_weights, args.weights_dir, device, args.seed, weights=weights)
    elif args.model:
        model = args.model
    else:  # the embedded model, as `pagoda serve` (vLLM's bench has a default model too)
        from tokenizer_svc.model_source import ModelLoadError, embedded_gguf_path

        try:
            model = embedded_gguf_path()
        except ModelLoadError as e:
            raise SystemExit(f"pagoda bench: no --model or --random-weights, and {e}") from None
        report["model"] = model
    from protocol.config import FP8_KV_CACHE_DTYPES

    kv_bytes = 1 if engine_flag("--kv-cache-dtype") in FP8_KV_CACHE_DTYPES else 2 if device.startswith("cuda") else 4
    cost = ModelCost.of(model, hw, kv_bytes) if os.path.isdir(model) else None
    if cost is not None and engine_flag("--quantization") == "fp8":
        cost = cost.with_fp8_linears("--fp8-lm-head" in flags)  # the limit of the bytes this engine reads
    elif cost is not None and engine_flag("--quantization") in ("gptq", "awq"):
        cost = cost.with_int4_linears()  # dummy weights quantized at load: groups of 128
    vocab = _vocab(model)
    results: dict[str, Any] = {}
    report["results"] = results

    if args.workload == "throughput":
        reqs = random_requests(args.num_prompts, _lens(args.input_len), _lens(args.output_len), vocab, args.seed)
        limit = throughput_limit(cost, reqs) if cost else None
        runs = []
        for mns in args.max_num_seqs:
            r = run_pagoda(model, reqs, _engine_args(args, device, max_num_seqs=mns))
            r["max_num_seqs"] = mns
            runs.append(r)
        results["pagoda"] = runs
        if args.speculative_config:
            mns = args.max_num_seqs[-1]
            spec = run_pagoda(model, reqs, _engine_args(args, device, max_num_seqs=mns,
                                                        speculative_config=args.speculative_config))
            results["speculative"] = spec
            results["speculative_vs_none"] = _ratio(spec["output_tokens_per_s"], runs[-1]["output_tokens_per_s"])
        if args.structured_fraction:
            mns = args.max_num_seqs[-1]
            constrained = run_pagoda(model, reqs, _engine_args(args, device, max_num_seqs=mns),
                                     structured_fraction=args.structured_fraction)
            constrained["max_num_seqs"] = mns
            results["structured"] = constrained
            results["structured_vs_none"] = _ratio(constrained["output_tokens_per_s"], runs[-1]["output_tokens_per_s"])
        results["limit_output_tokens_per_s"] = limit
        best = max(r["output_tokens_per_s"] for r in runs)
        results["ratio_to_limit"] = _ratio(best, limit)
        if args.peer in ("hf", "hf-static"):
            results["hf_static"] = run_hf_static(model, reqs, device)
            results["ratio_to_hf_static"] = _ratio(best, results["hf_static"]["output_tokens_per_s"])
        if args.peer in ("hf", "hf-continuous"):
            results["hf_continuous"] = run_hf_continuous(model, reqs, device)
            results["ratio_to_hf_continuous"] = _ratio(best, results["hf_continuous"]["output_tokens_per_s"])
    elif args.workload == "latency":
        if args.prompts == "copy":
            from bench.copy_prompts import copy_prompt_ids

            reqs = [Req(ids, _lens(args.output_len)[1], ignore_eos=False) for ids in copy_prompt_ids(model)]
            runs = [run_pagoda(model, reqs, _engine_args(args, device), one_at_a_time=True)]
        else:
            reqs = random_requests(3, _lens(args.input_len), _lens(args.output_len), vocab, args.seed)
            r = run_pagoda(model, reqs[:1], _engine_args(args, device))
            runs = [r] + [run_pagoda(model, [q], _engine_args(args, device)) for q in reqs[1:2]]
        best = max(runs, key=lambda x: x["decode_tokens_per_s_mean"])
        results["pagoda"] = {"ttft_s": min(x["ttft_mean_s"] for x in runs),
                             "decode_tokens_per_s": best["decode_tokens_per_s_mean"], "runs": runs}
        if args.speculative_config:
            spec = run_pagoda(model, reqs if args.prompts == "copy" else reqs[:1],
                              _engine_args(args, device, speculative_config=args.speculative_config),
                              one_at_a_time=args.prompts == "copy")
            results["speculative"] = spec
            results["speculative_vs_none"] = {
                "decode": spec["decode_tokens_per_s_mean"] / runs[0]["decode_tokens_per_s_mean"],
                "same_greedy_tokens": spec["output_token_ids"] == runs[0]["output_token_ids"]}
        if cost:
            ctx = len(reqs[0].prompt_ids) + reqs[0].output_len // 2
            results["limit"] = {"decode_tokens_per_s": 1 / cost.decode_step_seconds(ctx),
                                "ttft_s": cost.prefill_seconds(len(reqs[0].prompt_ids))}
            results["ratio_to_limit"] = {
                "decode": results["pagoda"]["decode_tokens_per_s"] / results["limit"]["decode_tokens_per_s"],
                "ttft": results["limit"]["ttft_s"] / results["pagoda"]["ttft_s"]}
        peers = {"hf": run_hf_latency, "llama_cpp": run_llamacpp_latency}
        for name, fn in peers.items():
            if name.replace("_", ".") in args.peer.split("+"):
                results[name] = fn(model, reqs[0], device)
                results[f"ratio_to_{name}"] = {
                    "decode": results["pagoda"]["decode_tokens_per_s"] / results[name]["decode_tokens_per_s"],
                    "ttft": results[name]["ttft_s"] / results["pagoda"]["ttft_s"]}
    elif args.workload == "prefix":
        prefix = random_requests(1, (args.prefix_len, args.prefix_len), (1, 1), vocab, args.seed + 1)[0].prompt_ids
        reqs = random_requests(args.num_prompts, (args.suffix_len, args.suffix_len),
                               (args.output_len, args.output_len), vocab, args.seed, prefix=prefix)
        for name, on in (("caching_on", True), ("caching_off", False)):
            results[name] = run_pagoda(model, reqs, _engine_args(args, device, enable_prefix_caching=on))
            q = results[name]["prefix_cache_queries"]
            results[name]["hit_rate"] = results[name]["prefix_cache_hits"] / q if q else 0.0
        results["ttft_speedup"] = results["caching_off"]["ttft_mean_s"] / results["caching_on"]["ttft_mean_s"]
        if cost:
            results["limit_ttft_s_all_cached"] = cost.prefill_seconds(len(reqs[0].prompt_ids), args.prefix_len)
    elif args.workload == "serve":
        results.update(_serve(args, model, vocab, device, cost))
    elif args.workload == "faults":
        results.update(_faults(args, model, vocab, device))


def _config_only_shape(args: argparse.Namespace) -> None:
    """A shape saved without weights runs on weights made at load: `--load-format dummy` is
    added to the engine args (unless they name a load format), and a peer, which would need
    the weights, is refused."""
    from bench.shapes import CONFIG_ONLY

    if args.random_weights not in CONFIG_ONLY:
        return
    if args.peer != "none":
        raise SystemExit(f"pagoda bench: --random-weights {args.random_weights} has no saved weights for the "
                         f"transformers peer (Pagoda makes them at load, --load-format dummy); use --peer none")
    if not any(a.startswith("--load-format") for a in args.engine_args.split()):
        args.engine_args = f"{args.engine_args} --load-format dummy".strip()


def _serve(args: argparse.Namespace, model: str, vocab: int, device: str, cost: Any) -> dict[str, Any]:
    from bench.serve import auth_headers, prefix_cache_counters, run_rate
    from bench.workloads import random_requests, run_hf_continuous, run_hf_static, throughput_limit

    rates = [float(x) for x in args.request_rate.split(",")]
    # Fresh prompts for each rate: the server's prefix cache still holds the last rate's, and
    # reusing them would turn every later rate's prefill into cache hits.
    req_sets = [random_requests(args.num_prompts, _lens(args.input_len), _lens(args.output_len), vocab, args.seed + i)
                for i in range(len(rates))]
    proc = None
    base_url = args.base_url
    if base_url is None:
        proc, base_url = _start_server(args, model, device)
    try:
        import httpx

        models = httpx.get(base_url + "/v1/models", headers=auth_headers())
        if models.status_code != 200:
            raise SystemExit(f"{base_url}/v1/models answered {models.status_code}: {models.text[:300]}")
        served = models.json()["data"][0]["id"]
        runs = []
        for rate, reqs in zip(rates, req_sets, strict=True):
            before = prefix_cache_counters(base_url)
            run = asyncio.run(run_rate(base_url, served, reqs, rate, args.seed, args.slo_ttft_ms / 1e3,
                                       args.slo_tpot_ms / 1e3))
            queries, hits = prefix_cache_counters(base_url, before, sum(len(r.prompt_ids) for r in reqs))
            run["prefix_cache_hit_rate"] = hits / queries if queries else 0.0
            runs.append(run)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    out: dict[str, Any] = {"pagoda": runs}
    burst = next((i for i, rate in enumerate(rates) if math.isinf(rate)), None)
    if cost:
        req = req_sets[0][0]
        out["limit_tpot_s_one_stream"] = cost.decode_step_seconds(len(req.prompt_ids) + req.output_len // 2)
        out["limit_ttft_s_one_request"] = cost.prefill_seconds(len(req.prompt_ids))
        if burst is not None:
            out["limit_output_tokens_per_s_all_at_once"] = throughput_limit(cost, req_sets[burst])
            out["ratio_to_limit_all_at_once"] = runs[burst]["output_tokens_per_s"] / out[
                "limit_output_tokens_per_s_all_at_once"]
    if args.peer != "none":
        # transformers has no server on the GPU machines that streams token-id prompts with
        # ignore_eos, so its engines take the all-at-once rate's requests (else the last rate's)
        # offline, in this process once the server is gone: a peer without HTTP, the
        # tokenizers or any arrival process, i.e. its best case for the all-at-once row.
        reqs = req_sets[burst if burst is not None else -1]
        for name, fn in (("hf_static", run_hf_static), ("hf_continuous", run_hf_continuous)):
            if args.peer in ("hf", name.replace("_", "-")):
                peer = out[name] = fn(model, reqs, device)
                peer["num_requests"] = len(reqs)
                peer["requests_per_s"] = len(reqs) / peer.get("serving_s", peer["elapsed_s"])
                if burst is not None:
                    out[f"ratio_to_{name}_all_at_once"] = runs[burst]["output_tokens_per_s"] / peer[
                        "output_tokens_per_s"]
    return out


def _start_server(args: argparse.Namespace, model: str, device: str,
                  log: Any = None) -> tuple[subprocess.Popen, str]:
    """`pagoda serve` on `model`, ready; its output to `log` (a file) if given."""
    port = 8400 + os.getpid() % 500
    flags = [f"--model={model}", f"--port={port}", f"--device={device}", *args.engine_args.split()]
    if getattr(args, "speculative_config", None):
        flags.append(f"--speculative-config={args.speculative_config}")
    proc = subprocess.Popen([sys.executable, "-m", "pagoda", "serve", *flags], stdout=log, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    _wait_ready(base_url, proc)
    return proc, base_url


def _faults(args: argparse.Namespace, model: str, vocab: int, device: str) -> dict[str, Any]:
    import httpx

    from bench.faults import LogWatcher, run_faults
    from bench.serve import auth_headers
    from bench.workloads import random_requests

    reqs = random_requests(args.num_prompts, _lens(args.input_len), _lens(args.output_len), vocab, args.seed)
    log_path = args.server_log or tempfile.mktemp(prefix="pagoda-faults-", suffix=".log")
    with open(log_path, "w") as log:
        watcher = LogWatcher(log_path)
        watcher.start()
        began = time.monotonic()
        proc, base_url = _start_server(args, model, device, log)
        try:
            out = {"startup_s": time.monotonic() - began, "server_log": log_path}
            served = httpx.get(base_url + "/v1/models", headers=auth_headers()).json()["data"][0]["id"]
            out.update(run_faults(base_url, served, reqs, proc.pid, watcher, args.kill, args.kill_after))
        finally:
            proc.send_signal(signal.SIGTERM)
            out_code = proc.wait(120)
            watcher.stop()
        out["server_exit_code"] = out_code
        out["restarts_logged"] = [line for _, line in watcher.lines if "restart" in line][:10]
    return out


def _wait_ready(base_url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(base_url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def _plot(report: dict[str, Any], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    res, paths = report["results"], []
    if report["workload"] == "serve":
        runs = [r for r in res["pagoda"] if r["request_rate"] != "inf"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for metric in ("ttft_s", "tpot_s"):
            for p in ("p50", "p99"):
                ax.plot([r["request_rate"] for r in runs], [r[metric][p] * 1e3 for r in runs], "o-",
                        label=f"{metric[:-2].upper()} {p}")
        ax.set(xlabel="request rate (req/s)", ylabel="ms", title="Latency against request rate")
        ax.legend()
        paths.append(os.path.join(folder, "serve_latency.png"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    elif report["workload"] == "throughput":
        runs = res["pagoda"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["max_num_seqs"] for r in runs], [r["output_tokens_per_s"] for r in runs], "o-", label="Pagoda")
        if res.get("limit_output_tokens_per_s"):
            ax.axhline(res["limit_output_tokens_per_s"], ls="--", color="gray", label="limit")
        ax.set(xlabel="max batch size (--max-num-seqs)", ylabel="output tok/s", title="Throughput against batch size")
        ax.legend()
        paths.append(os.path.join(folder, "throughput_batch.png"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths


def run_bench(args: argparse.Namespace) -> int:
    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(f"pagoda bench: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    report: dict[str, Any] = {}
    status = 0
    try:
        _run(args, report)
        if args.plot:
            report["plots"] = _plot(report, args.plot)
    except BaseException as e:
        report["incomplete"] = repr(e)
        status = 1
        raise
    finally:
        text = json.dumps(report, indent=2, default=str)
        if args.output_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
            with open(args.output_json, "w") as f:
                f.write(text)
        print(text)
    return status
