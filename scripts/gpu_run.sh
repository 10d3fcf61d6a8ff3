#!/usr/bin/env bash
# Everything GPU-side in one go, on a GPU machine that has torch, Triton and transformers but
# none of Pagoda's other dependencies and no network: installs them from the wheels brought
# along in .whl/ (copied from the steering repo's device-wheels), runs the tests marked `gpu`,
# then the benchmarks, and writes JSON and logs to OUTDIR.
#
#   scripts/gpu_run.sh OUTDIR [tests|kernels|gemm|latency|throughput|prefix|serve|faults|profile ...]
#
# With no step named, every step but gemm, faults and profile runs. faults: kill -9 the worker
# (FAULTS_KILL: any of worker tokenizer scheduler) under 256 streams on the llama3-8b shape (bench/faults.py). gemm: cuBLAS and our skinny linear
# on the decode projections, and decode attention at T's shapes, swept (bench/kernels.py).
# profile: the runner alone, torch profiler tables of decode and of a warm prefill step
# (scripts/profile_step.py). BENCH_TIMEOUT caps each benchmark (seconds).
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

bench() {
    local name=$1; shift
    echo "== bench $name: $*"
    timeout "${BENCH_TIMEOUT:-900}" python3 -m pagoda bench "$@" --output-json "$out/$name.json" \
        > "$out/$name.log" 2>&1
    echo "   exit $? ($(tail -c 300 "$out/$name.log" | tr '\n' ' '))"
}

for step in $steps; do
    case $step in
        tests) # two processes: the kernel tests beside the model tests (mostly Triton compiling)
            timeout "${TESTS_TIMEOUT:-1200}" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 \
                tests/kernels/test_triton.py > "$out/pytest_gpu_kernels.log" 2>&1 &
            timeout "${TESTS_TIMEOUT:-1200}" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 \
                --ignore tests/kernels/test_triton.py > "$out/pytest_gpu.log" 2>&1
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
        *) echo "unknown step $step"; exit 2 ;;
    esac
done
