#!/usr/bin/env bash
# The kernels on a GPU machine in one go: their tests (small shapes and full shapes, compiled),
# then workload K (bench/kernels.py), its tiling sweep included unless --no-sweep.
#   scripts/gpu_kernels.sh OUT_DIR [--no-sweep]
# Needs only torch and triton (no pyzmq, msgspec or fastapi). Writes env.txt, pytest.log,
# kernels.json and bench.log under OUT_DIR; exits non-zero if a test failed.
set -uo pipefail
out=${1:?usage: scripts/gpu_kernels.sh OUT_DIR [--no-sweep]}
sweep=--sweep
[[ "${2:-}" == "--no-sweep" ]] && sweep=
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    >"$out/env.txt" 2>&1
tail -n 1 "$out/env.txt"

start=$SECONDS
timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
    tests/kernels/test_triton.py 2>&1 | tee "$out/pytest.log" | tail -n 15
tests=${PIPESTATUS[0]}
echo "tests: exit $tests in $((SECONDS - start)) s"

start=$SECONDS
timeout "${BENCH_TIMEOUT:-420}" python3 -m bench.kernels $sweep --out "$out/kernels.json" >"$out/bench.out" 2>"$out/bench.log"
echo "bench: exit $? in $((SECONDS - start)) s"
tail -n 6 "$out/bench.out"
tail -n 40 "$out/bench.log"
exit "$tests"
