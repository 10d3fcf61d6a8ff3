#!/usr/bin/env bash
# Everything GPU-side in one go, on a GPU machine that has torch, Triton and transformers but
# none of Pagoda's other dependencies and no network: installs them from the wheels brought
# along in .whl/ (copied from the steering repo's device-wheels), runs the tests marked `gpu`,
# then the benchmarks, and writes JSON and logs to OUTDIR.
#
#   scripts/gpu_run.sh OUTDIR [tests|kernels|gemm|latency|throughput|prefix|serve|faults|structured|profile
#                              |tp-latency|tp-70b|tp-throughput ...]
#
# With no step named, every step but gemm, faults, profile and the tp-* steps runs. faults: kill -9 the worker
# (FAULTS_KILL: any of worker tokenizer scheduler) under 256 streams on the llama3-8b shape (bench/faults.py). gemm: cuBLAS and our skinny linear
# on the decode projections, and decode attention at T's shapes, swept (bench/kernels.py).
# structured: workload T, then again with half its requests constrained by a JSON schema, and
# the TTFT a schema adds (STRUCTURED_FRACTION). profile: the runner alone, torch profiler tables of decode and of a warm prefill step
# (scripts/profile_step.py). BENCH_TIMEOUT caps each benchmark (seconds).
# Tensor parallel (nvidia-h200-x2 / -x4 machines; a size needing more GPUs than are visible is
# skipped with a line saying so): tp-latency: L on llama3-8b at TP=1, 2 and 4, no peer;
# tp-70b: llama3-70b on weights made at load (--load-format dummy, no peer) at TP=2 and 4,
# L at batch 1 and 64 prompts of 512 in / 256 out at --max-num-seqs 64 (the batch-64 figure);
# tp-throughput: workload T as the throughput step, at TP=2. One JSON each, named -tpN.
# SERVE_PROMPTS / SERVE_RATES narrow workload S (docs/BENCHMARKS.md: 400 requests at 1,4,16,inf req/s).
# PAGODA_GIT_COMMIT names the commit in the JSON where the tree was copied without its history.
set -uo pipefail
out=${1:?usage: scripts/gpu_run.sh OUTDIR [steps...]}
shift
steps=${*:-tests kernels latency throughput prefix serve}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PAGODA_CACHE_DIR=/tmp/pagoda-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    ngpu=${#visible[@]}
else
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
fi

bench() {
    local name=$1; shift
    echo "== bench $name: $*"
    timeout "${BENCH_TIMEOUT:-900}" python3 -m pagoda bench "$@" --output-json "$out/$name.json" \
        > "$out/$name.log" 2>&1
    echo "   exit $? ($(tail -c 300 "$out/$name.log" | tr '\n' ' '))"
}

# fits NAME TP: whether TP GPUs are visible; if not, a line saying NAME is skipped.
fits() {
    (( $2 <= ngpu )) && return 0
    echo "== $1: skipped (tensor parallel size $2 needs $2 GPUs, $ngpu visible)"
    return 1
}

for step in $steps; do
    case $step in
        tests) # two processes: the kernel tests beside the model tests (mostly Triton compiling)
            timeout "${TESTS_TIMEOUT:-1200}" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 \
                tests/kernels/test_triton.py > "$out/pytest_gpu_kernels.log" 2>&1 &
            # (the GPU machine has no selenium or jsonschema, nor the embedded model's wheel: modules that need
            # them, none with gpu tests, are left out)
            timeout "${TESTS_TIMEOUT:-1200}" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 \
                --ignore tests/kernels/test_triton.py --ignore tests/browser --ignore tests/e2e/test_structured_outputs.py \
                --ignore tests/e2e/test_tool_calls.py --ignore tests/e2e/test_speculative.py > "$out/pytest_gpu.log" 2>&1
            wait
            tail -n 12 "$out/pytest_gpu_kernels.log" "$out/pytest_gpu.log" ;;
        kernels) bench kernels kernels ;;
        gemm) echo "== bench kernels --sweep --only gemm,t_decode"  # cuBLAS and ours at the decode projections
            timeout "${BENCH_TIMEOUT:-900}" python3 -m bench.kernels --sweep --only gemm,t_decode \
                --out "$out/gemm.json" > /dev/null 2> "$out/gemm.log"
            echo "   exit $? ($(grep -c 'gemm ' "$out/gemm.log") gemm rows)" ;;
        latency) bench latency latency --random-weights llama3-8b --peer "${PEER:-hf}" ;;
        throughput) bench throughput throughput --random-weights qwen3-0.6b --peer "${PEER:-hf}" --plot "$out" \
            --engine-args "${T_ENGINE_ARGS:---max-num-batched-tokens 8192}" ;;
        prefix) bench prefix prefix --random-weights llama3-8b ;;
        structured) bench structured throughput --random-weights qwen3-0.6b --peer none \
            --structured-fraction "${STRUCTURED_FRACTION:-0.5}" --engine-args "${T_ENGINE_ARGS:---max-num-batched-tokens 8192}" ;;
        profile) for spec in "qwen3-0.6b 16 600" "qwen3-0.6b 256 600" "llama3-8b 1 512"; do
                set -- $spec
                echo "== profile $1 batch $2 prompt $3"
                timeout "${BENCH_TIMEOUT:-900}" python3 scripts/profile_step.py --shape "$1" --batch "$2" \
                    --prompt-len "$3" --modes graphs --mixed-graph-tokens "${MIXED_GRAPH_TOKENS:-0}" \
                    > "$out/profile-$1-b$2.log" 2>&1
                echo "   exit $? ($(grep -m1 '^{' "$out/profile-$1-b$2.log"))"
            done ;;
        serve) bench serve serve --random-weights llama3-8b --num-prompts "${SERVE_PROMPTS:-400}" \
            --request-rate "${SERVE_RATES:-1,4,16,inf}" --plot "$out" --peer "${PEER:-hf}" ;;
        faults) for kill in ${FAULTS_KILL:-worker}; do  # FAULTS_DTYPE: float32 shows the replay is exact
                tag=faults-$kill-${FAULTS_DTYPE:-auto}
                bench "$tag" faults --random-weights llama3-8b --num-prompts "${FAULTS_PROMPTS:-256}" --kill "$kill" \
                    --server-log "$out/$tag-server.log" --engine-args "--dtype ${FAULTS_DTYPE:-auto}" ${FAULTS_ARGS:-}
            done ;;
        fp8-latency) # L on llama3-8b: bf16 against FP8 weights (W8A8), then with the LM head in FP8 too,
            # then with the fp8 KV cache as well (its 64-slot blocks), weights made at load, in the same call
            bench fp8-latency-bf16 latency --random-weights llama3-8b --peer none --engine-args "--load-format dummy"
            bench fp8-latency-fp8 latency --random-weights llama3-8b --peer none \
                --engine-args "--load-format dummy --quantization fp8"
            bench fp8-latency-fp8-head latency --random-weights llama3-8b --peer none \
                --engine-args "--load-format dummy --quantization fp8 --fp8-lm-head"
            bench fp8-latency-fp8-all latency --random-weights llama3-8b --peer none \
                --engine-args "--load-format dummy --quantization fp8 --fp8-lm-head --kv-cache-dtype fp8" ;;
        fp8-throughput) # T: bf16, FP8 weights, FP8 KV cache (twice the blocks), both
            for v in "bf16:" "fp8:--quantization fp8" "fp8kv:--kv-cache-dtype fp8" "fp8both:--quantization fp8 --kv-cache-dtype fp8"; do
                bench "fp8-throughput-${v%%:*}" throughput --random-weights qwen3-0.6b --peer none \
                    --engine-args "${T_ENGINE_ARGS:---max-num-batched-tokens 8192} --load-format dummy ${v#*:}"
            done ;;
        spec) # T with n-gram drafts against none (the batch rule); L with the target as its own draft model
            bench spec-throughput-ngram throughput --random-weights qwen3-0.6b --peer none \
                --engine-args "${T_ENGINE_ARGS:---max-num-batched-tokens 8192} --load-format dummy" \
                --speculative-config '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}' ;;
        spec-draft) # verification's cost (the runner alone), then L with llama3-8b drafting for itself
            for g in 0 16; do  # verification steps eager, then replaying CUDA graphs of 16 tokens
                timeout "${BENCH_TIMEOUT:-900}" python3 scripts/spec_verify_cost.py --shape llama3-8b --k 2 4 \
                    --mixed-graph-tokens $g > "$out/spec-verify-cost-g$g.json" 2> "$out/spec-verify-cost-g$g.log"
                echo "== spec-verify-cost graphs $g: exit $? ($(tr -d '\n ' < "$out/spec-verify-cost-g$g.json" | head -c 700))"
            done
            bench spec-latency-self-draft latency --random-weights llama3-8b --peer none \
                --engine-args "--load-format dummy --gpu-memory-utilization 0.4 --step-log $out/spec-steps.jsonl" \
                --speculative-config '{"method": "draft_model", "model": "/tmp/pagoda-bench-weights/llama3-8b", "num_speculative_tokens": 4}' ;;
        tp-latency) for tp in 1 2 4; do
                fits "tp-latency-tp$tp" "$tp" || continue
                bench "tp-latency-tp$tp" latency --random-weights llama3-8b --engine-args "--tensor-parallel-size $tp"
            done ;;
        tp-70b) for tp in 2 4; do  # 141 GB of bf16 weights: from 2 GPUs
                fits "tp-70b-tp$tp" "$tp" || continue
                bench "tp-70b-latency-tp$tp" latency --random-weights llama3-70b \
                    --engine-args "--tensor-parallel-size $tp"
                bench "tp-70b-throughput-tp$tp" throughput --random-weights llama3-70b --num-prompts 64 \
                    --input-len 512 --output-len 256 --max-num-seqs 64 --engine-args "--tensor-parallel-size $tp"
            done ;;
        tp-throughput) fits tp-throughput-tp2 2 \
            && bench tp-throughput-tp2 throughput --random-weights qwen3-0.6b --peer "${PEER:-hf}" --plot "$out/tp2" \
                --engine-args "${T_ENGINE_ARGS:---max-num-batched-tokens 8192} --tensor-parallel-size 2" ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac
done
