#!/bin/bash
# One call on a lent GPU (issue 5's GPU targets): correctness first, then the benchmark, in stages
# ordered by what the targets need, each under its own time limit so that one slow stage cannot eat
# the lease. Everything lands in $OUT (the device tool's folder; /tmp/gpu_round here): the
# environment, gpu_check's report, and the benchmark's JSON lines, which bench_bn.py writes case by
# case and resumes from, so calling this again continues where a limit stopped it. The last lines
# printed are the benchmark's target summary.
#
#   bash scripts/gpu_round.sh            on the GPU machine (its python3 holds torch and triton)
#   DRY=1 bash scripts/gpu_round.sh      here: the correctness checks through Triton's interpreter
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_round}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src

if [ "${DRY:-0}" = "1" ]; then
    TRITON_INTERPRET=1 "$PY" benchmarks/gpu_check.py --dry-run 2>&1 | tee "$OUT/gpu_check_dry.txt" | tail -5
    exit "${PIPESTATUS[0]}"
fi

{
    nvidia-smi
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
tail -1 "$OUT/env.txt"

# 1. Correctness on the device: a mismatch or a silent fall-back means the timings are worthless.
timeout 180 "$PY" benchmarks/gpu_check.py > "$OUT/gpu_check.txt" 2>&1
check=$?
tail -3 "$OUT/gpu_check.txt"
if [ "$check" -ne 0 ]; then
    echo "gpu_check failed (exit $check): no timings taken; see $OUT/gpu_check.txt"
    exit 1
fi

RESULTS="$OUT/gpu.jsonl"
bench() {  # bench LIMIT_SECONDS ARGS...: one stage, appending to $RESULTS
    local limit=$1
    shift
    timeout "$limit" "$PY" benchmarks/bench_bn.py --device cuda --out "$RESULTS" "$@" >> "$OUT/bench.txt" 2>&1
    echo "stage ($*) exit $?" >> "$OUT/bench.txt"
}
# 2. The bandwidth, torch and fused targets: the 411 MB shapes and two conv shapes, both layouts.
bench 240 --shapes gpu-112,gpu-56,conv-56,conv-14 --dtypes fp32,bf16 --layouts nchw,cl --rounds 9 \
    --modes fwd,fwdbwd,eval,relu_fwdbwd,addrelu_fwdbwd
# 3. Other tiles (triton_plan.Tiles are first guesses): each kernel family alone under six
#    candidates; if a better one is found, the bandwidth and fused targets again under it, into a
#    file of their own ("best tiles: ..." in tune.txt is what to put in triton_plan.GPU_TILES).
timeout 100 "$PY" benchmarks/triton_tune.py --shapes gpu-112,gpu-56 --out "$OUT/tune.jsonl" \
    > "$OUT/tune.txt" 2>&1
echo "stage (triton_tune) exit $?" >> "$OUT/tune.txt"
tiles=$(sed -n 's/^best tiles: \([0-9,]*\).*/\1/p' "$OUT/tune.txt")
if [ -n "$tiles" ] && [ "$tiles" != "2048,4,2048,4,1024" ]; then
    timeout 100 "$PY" benchmarks/bench_bn.py --device cuda --out "$OUT/gpu_tuned.jsonl" --triton-tiles "$tiles" \
        --shapes gpu-112,gpu-56 --dtypes fp32 --layouts nchw,cl --rounds 9 \
        --modes fwd,fwdbwd,eval,relu_fwdbwd,addrelu_fwdbwd >> "$OUT/bench.txt" 2>&1
    echo "stage (tuned tiles $tiles) exit $?" >> "$OUT/bench.txt"
fi
tail -3 "$OUT/tune.txt"
# 4. The one-program kernels of small rows of channels (triton_small) against the general ones on
#    the same input: (256, 100) with the general path forced (a threshold of 0), into a file of its
#    own, to set against its cases in gpu.jsonl.
timeout 60 "$PY" benchmarks/bench_bn.py --device cuda --out "$OUT/gpu_general_small.jsonl" --triton-small-numel 0 \
    --shapes mlp-small --dtypes fp32,bf16 --layouts nchw --rounds 9 --modes fwd,fwdbwd >> "$OUT/bench.txt" 2>&1
echo "stage (general kernels on small inputs) exit $?" >> "$OUT/bench.txt"
# 5. The remaining shapes, then torch.compile on the target shapes (slow to compile).
bench 120 --shapes mlp-small,mlp-large,conv-32s,conv-32l --dtypes fp32,bf16 --layouts nchw,cl --rounds 9
bench 150 --compile --shapes gpu-56,conv-56,conv-14 --dtypes fp32 --layouts nchw --modes fwdbwd --rounds 9

"$PY" benchmarks/bench_bn.py --device cuda --report --out "$RESULTS" 2>&1 | tail -12
