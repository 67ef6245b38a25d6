#!/bin/bash
# One call on a lent GPU (issue 5's GPU targets): correctness first, then the benchmark, in stages
# ordered by what the targets need, each under its own time limit so that one slow stage cannot eat
# the lease. Everything lands in $OUT (the device tool's folder; /tmp/gpu_round here): the
# environment, one log of every stage (gpu_check's report among it), and the benchmark's JSON lines,
# which bench_bn.py writes case by case and resumes from, so calling this again with the same $OUT
# continues where a limit stopped it. The last lines printed are the benchmark's target summary.
#
#   BUDGET=540 bash scripts/gpu_round.sh  on the GPU machine (its python3 holds torch and triton);
#                                        BUDGET: seconds for the whole round (default 540)
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

# The lease is short (15 minutes of device time a session, the machine's start included): every
# stage runs under min(its own limit, what is left of BUDGET seconds less a reserve for the
# report), in the order the targets need it, and is skipped when under 15 seconds are left.
BUDGET=${BUDGET:-540}
case "$BUDGET" in
    '' | *[!0-9]*) echo "gpu_round.sh: BUDGET: expected a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
STARTED=$(date +%s)
LOG="$OUT/log.txt"  # one log for every stage: the tool brings back at most 8 files
limit_for() {  # limit_for WANTED: seconds this stage may take
    local left=$((BUDGET - 10 - ($(date +%s) - STARTED)))
    if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
stage() {  # stage NAME WANTED COMMAND...: one stage, its output appended to the log
    local name=$1 limit
    limit=$(limit_for "$2")
    shift 2
    if [ "$limit" -lt 15 ]; then
        echo "stage ($name) skipped: $limit s left" | tee -a "$LOG"
        return 1
    fi
    local t0=$(date +%s)
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "stage ($name) exit $rc after $(($(date +%s) - t0)) s (limit $limit)" | tee -a "$LOG"
    return $rc
}

{
    nvidia-smi
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
tail -1 "$OUT/env.txt"

# 1. Correctness on the device: a mismatch or a silent fall-back means the timings are worthless.
#    QUICK=1: after a change to the kernels, in a short lease: one shape of each way the statistics
#    kernels see an input, then the 411 MB shapes, the reduce kernels under other program counts,
#    each kernel's time inside module calls, the host's time per call, and the kernels alone under
#    other tiles; nothing else.
QUICK=${QUICK:-0}
if [ "$QUICK" = "1" ]; then
    stage gpu_check 140 "$PY" benchmarks/gpu_check.py --quick
else
    stage gpu_check 200 "$PY" benchmarks/gpu_check.py
fi
check=$?
grep -E "^(FAIL|[0-9]+ failure)" "$LOG" | tail -8
if [ "$check" -ne 0 ]; then
    echo "gpu_check failed (exit $check): no timings taken; see $LOG"
    exit 1
fi

RESULTS="$OUT/gpu.jsonl"
# The reduce kernels' programs per multiprocessor (triton_plan.PROGRAMS_PER_SM = 4): the kernels
# alone under other counts; a layout whose best count is another one runs its 411 MB training
# cases again under it, into a file of its own. With them, the reduce kernels on NCHW rows in
# tiles fitted to their length (triton_plan.ROW_FIT, off): if faster so, the 411 MB NCHW cases run
# again under it, into a file of their own.
programs() {
    stage programs 100 "$PY" benchmarks/triton_programs.py --shapes gpu-112,gpu-56 --per-sm 3,4,8 --row-fit
    grep "^row fit better" "$LOG" | tail -1
    if grep -q "^row fit better: yes" "$LOG"; then
        stage row_fit 40 "$PY" benchmarks/bench_bn.py --device cuda --out "$OUT/gpu_row_fit.jsonl" --triton-row-fit \
            --shapes gpu-112,gpu-56 --dtypes fp32,bf16 --layouts nchw --rounds 9 --modes fwd,fwdbwd,eval
    fi
    local layout best
    for layout in nchw cl; do
        best=$(sed -n "s/^best programs per SM, $layout: \([0-9]*\)$/\1/p" "$LOG" | tail -1)
        grep "^best programs per SM, $layout" "$LOG" | tail -1
        if [ -n "$best" ] && [ "$best" != "4" ]; then
            stage "programs_$layout" 40 "$PY" benchmarks/bench_bn.py --device cuda --out "$OUT/gpu_programs.jsonl" \
                --triton-programs "$best" --shapes gpu-112,gpu-56 --dtypes fp32,bf16 --layouts "$layout" --rounds 9 \
                --modes fwd,fwdbwd
        fi
    done
}
if [ "$QUICK" = "1" ]; then
    stage large 80 "$PY" benchmarks/bench_bn.py --device cuda --out "$RESULTS" --shapes gpu-112,gpu-56 \
        --dtypes fp32,bf16 --layouts nchw,cl --rounds 9 --modes fwd,fwdbwd,eval,relu_fwdbwd,addrelu_fwdbwd
    programs
    # where a module call's time goes (each kernel inside it, the host's gaps), then the host's time
    # per call with bnlab's direct launches and with Triton's own launch path, and with the compiled
    # calls off (module_forward's Python checks instead of the layer call's route: thirty-first session)
    stage kernel_times 40 "$PY" benchmarks/gpu_kernel_times.py --shapes gpu-112,conv-56 --dtypes fp32,bf16 \
        --layouts nchw,cl --modes fwd,fwdbwd
    stage host_time 55 "$PY" benchmarks/triton_host_time.py --device cuda --calls 300 --shapes 32,64,56,56 256,100 \
        --python-path
    # the same steps without the host: replayed from CUDA graphs (and whether bnlab's can be captured)
    stage graphs 40 "$PY" benchmarks/gpu_graphs.py --shapes conv-56,mlp-small --dtypes fp32,bf16
    stage tune 75 "$PY" benchmarks/triton_tune.py --shapes gpu-112 --dtypes fp32,bf16 --out "$OUT/tune.jsonl"
    grep "^best tiles" "$LOG" | tail -1
    grep -E "(direct|triton) +[0-9.]+ us" "$LOG" | tail -6
    grep -E "^[a-z0-9-]+/[a-z]+/[a-z0-9]+ (bnlab|torch\.nn) *: " "$LOG" | tail -8
    "$PY" benchmarks/bench_bn.py --device cuda --report --out "$RESULTS" 2>&1 | grep -v "^|" | tail -12
    exit 0
fi
bench() {  # bench NAME WANTED ARGS...: a benchmark stage appending to $RESULTS (resumable)
    local name=$1 wanted=$2
    shift 2
    stage "$name" "$wanted" "$PY" benchmarks/bench_bn.py --device cuda --out "$RESULTS" "$@"
}
# 2. The bandwidth, torch and fused targets: the 411 MB shapes and two conv shapes, both layouts.
bench targets 220 --shapes gpu-112,gpu-56,conv-56,conv-14 --dtypes fp32,bf16 --layouts nchw,cl --rounds 9 \
    --modes fwd,fwdbwd,eval,relu_fwdbwd,addrelu_fwdbwd
# 3. Whether torch.nn runs cuDNN or its native kernels here (the "vs cuDNN" target names cuDNN).
stage kernel_names 25 "$PY" benchmarks/torch_kernel_names.py
# 4. The remaining shapes (the "never slower than torch" target covers every benchmarked shape).
bench other_shapes 100 --shapes mlp-small,mlp-large,conv-32s,conv-32l --dtypes fp32,bf16 --layouts nchw,cl --rounds 9
# 5. The one-program kernels of small rows of channels (triton_small) against the general ones on
#    the same input: (256, 100) with the general path forced (a threshold of 0), into a file of its
#    own, to set against its cases in gpu.jsonl.
stage general_small 40 "$PY" benchmarks/bench_bn.py --device cuda --out "$OUT/gpu_general_small.jsonl" \
    --triton-small-numel 0 --shapes mlp-small --dtypes fp32,bf16 --layouts nchw --rounds 9 --modes fwd,fwdbwd
# 6. Other tiles (triton_plan.Tiles are first guesses): each kernel family alone under six
#    candidates; if a better one is found, the bandwidth and fused targets again under it, into a
#    file of its own ("best tiles: ..." in the log is what to put in triton_plan.GPU_TILES).
stage tune 90 "$PY" benchmarks/triton_tune.py --shapes gpu-112,gpu-56 --out "$OUT/tune.jsonl"
tiles=$(sed -n 's/^best tiles: \([0-9,]*\).*/\1/p' "$LOG" | tail -1)
grep "^best tiles" "$LOG" | tail -1
if [ -n "$tiles" ] && [ "$tiles" != "2048,4,2048,4,1024,4" ]; then
    stage tuned 80 "$PY" benchmarks/bench_bn.py --device cuda --out "$OUT/gpu_tuned.jsonl" --triton-tiles "$tiles" \
        --shapes gpu-112,gpu-56 --dtypes fp32 --layouts nchw,cl --rounds 9 \
        --modes fwd,fwdbwd,eval,relu_fwdbwd,addrelu_fwdbwd
fi
# 7. The reduce kernels' programs per multiprocessor (see programs above).
programs
# 8. torch.compile on the target shapes (slow to compile): last, it gets what is left.
bench compile 150 --compile --shapes gpu-56,conv-56,conv-14 --dtypes fp32 --layouts nchw --modes fwdbwd --rounds 9

"$PY" benchmarks/bench_bn.py --device cuda --report --out "$RESULTS" 2>&1 | tail -14
