#!/usr/bin/env bash
# Workloads T and L for two trees in one device call, interleaved (A, B, A, B), so a change
# is judged against its parent on the same machine: run-to-run spread between device calls
# is about 2%, more than many changes move.
#
#   git archive BASE | (mkdir -p .bench/base && tar -x -C .bench/base)    # on the dev machine
#   scripts/gpu_ab.sh OUTDIR .bench/base [ROUNDS]                          # on the GPU machine
#
# Writes OUTDIR/{t,l}-{a,b}-N.json (a: the other tree, b: this one) and prints one line per
# run. A_COMMIT and B_COMMIT name the trees' commits in the JSON. Each tree runs its own CLI
# (`python -m pagoda`, or `python -m frontend.cli` in trees older than the pagoda/ package).
set -uo pipefail
out=${1:?usage: scripts/gpu_ab.sh OUTDIR OTHER_TREE [ROUNDS]}
other=$(cd "${2:?usage: scripts/gpu_ab.sh OUTDIR OTHER_TREE [ROUNDS]}" && pwd)
rounds=${3:-1}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
here=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONUNBUFFERED=1 PAGODA_CACHE_DIR=/tmp/pagoda-cache

bench() {  # tree name commit workload args...
    local tree=$1 name=$2 commit=$3; shift 3
    local cli="frontend.cli"
    [ -f "$tree/pagoda/__main__.py" ] && cli="pagoda"
    (cd "$tree" && PAGODA_GIT_COMMIT=$commit PYTHONPATH=/tmp/site:$tree timeout "${BENCH_TIMEOUT:-400}" python3 -m $cli bench "$@" \
        --output-json "$out/$name.json" > "$out/$name.log" 2>&1)
    echo "$name exit $? $(python3 - "$out/$name.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("no json:", e); sys.exit()
res = r["results"]
if isinstance(res["pagoda"], list):  # throughput
    print(f"output_tok_s={res['pagoda'][0]['output_tokens_per_s']:.1f} of_limit={res['ratio_to_limit']:.3f}")
else:  # latency
    p = res["pagoda"]
    print(f"decode_tok_s={p['decode_tokens_per_s']:.1f} ttft_ms={p['ttft_s'] * 1e3:.1f} "
          f"of_limit={res['ratio_to_limit']['decode']:.3f}")
EOF
)"
}

for i in $(seq 1 "$rounds"); do
    for side in a b; do
        tree=$other commit=${A_COMMIT:-}
        [ $side = b ] && tree=$here commit=${B_COMMIT:-}
        bench "$tree" "t-$side-$i" "$commit" throughput --random-weights qwen3-0.6b --peer none \
            --engine-args "--max-num-batched-tokens 8192"
        bench "$tree" "l-$side-$i" "$commit" latency --random-weights llama3-8b --peer none
    done
done
