#!/usr/bin/env bash
# One short GPU check, prepared to run as it is (device lease: ~15 minutes in all):
#   1. the kernel and model tests on the GPU, natively (no interpreter), bf16 included, with the
#      GPU launch settings (native runs always take them; SRDIT_LAUNCH=gpu says so), and the
#      CUDA-graph step against the eager step (tests/train/test_graphs.py)
#   1b. the step with srdit's gradient reduction captured in its CUDA graphs, on a one-rank NCCL
#      communicator launched by torchrun (it captures its all_reduce as eight do), against the
#      eager step (test_cuda_graph_step_with_the_nccl_reduction_captured_matches_eager), in the
#      library's order and in train.reduce_order=fixed (all-to-all, pairwise sums, all-gathers)
#   2. bench/throughput.py, sr-dit-b1-256 at the target's batch 256: eager, kernels, graphs,
#      cached-teacher, best (kernels + compile + graphs + cached teacher), then kernels with the
#      MLPs on cuBLAS (model.fused_mlp=false: is srdit's Triton GEMM worth it?), written row by row;
#      then the per-rank step of the paper's 8 x 32 run (--world 8: batch 32), kernels with and
#      without graphs, against bench/traffic.py --world 8's modelled step
#   3. bench/kernels.py at SR-DiT-B/1 shapes, batch 32 and 256, Triton against eager (torch.compile
#      of each op's twin is left out: its compiles would use up the step), with --sweep (each kernel's
#      candidate launch settings against the default, batch 256): the "after" rows; then the
#      Triton ops of the commit before issue 11's kernel changes (KERNELS_BEFORE, a git worktree,
#      when this copy has the history): the "before" rows; every attention backend at the step's
#      two shapes (257 and 64 tokens), what attention_backend=auto chooses between
#   3b. bench/traffic.py --measure: each phase's device time (torch.profiler) next to its bytes
#      and modelled time counted on the CPU (the kernels + cached-teacher step), to check the model
#   4. bench/data.py: the loaders alone (synthetic shards; no DALI on the device image)
#   5. bench/sample.py: samples/s per NFE, decode and metric costs, a 50K-evaluation projection
# Usage: bash bench/gpu_check.sh OUTDIR   (on the device machine: bash bench/gpu_check.sh "$OUT")
# Then, back here: python bench/record.py FETCHED_OUTDIR adds the rows to bench/RESULTS.md.
# Writes OUTDIR/log.txt (everything printed, the tests' results included) and one JSON per
# benchmark: 8 files, within the device tool's 8-file limit. The step timeouts add up to 500 s:
# under one device call's 10 minutes, and a lease's 15 leave room for the machine's start and a
# partial rerun (run one step's command alone). A step cut short keeps what it wrote: throughput.py
# writes its JSON after every variant. Compiling (inductor) dominates the throughput step, so
# kernels+compile and compile alone are left to a longer run.
set -uo pipefail
OUT="${1:?usage: bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SRDIT_LAUNCH=gpu HF_HUB_OFFLINE=1 WANDB_MODE=disabled
KERNELS_BEFORE=9e48eb2  # the last commit before issue 11's kernel changes
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/log.txt"
status=0

run() {  # run NAME SECONDS CMD...: append its output to the log, keep going on failure
    local name=$1 seconds=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
    timeout "$seconds" "$@" >> "$LOG" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || { echo "=== $name FAILED (exit $rc)" | tee -a "$LOG"; status=1; }
}

run env 15 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
    python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.version.cuda)";
    git rev-parse --short=12 HEAD'
run tests 105 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/model/test_model.py tests/train/test_graphs.py \
    -k "not nccl"
run nccl-step 40 python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m pytest -q -p no:cacheprovider \
    tests/train/test_graphs.py -k nccl
run throughput-b256 150 python3 bench/throughput.py --preset sr-dit-b1-256 --batch 256 --steps 10 \
    --variants eager kernels graphs cached-teacher best kernels-cublas-mlp --json "$OUT/throughput_b256.json"
run throughput-8x32 35 python3 bench/throughput.py --preset sr-dit-b1-256 --world 8 --steps 20 \
    --variants kernels kernels+graphs --json "$OUT/throughput_w8.json"
run kernels 65 python3 bench/kernels.py --batch 32 256 --variants eager triton --sweep --sweep-batch 256 --attention \
    --iters 10 --json "$OUT/kernels.json"
run kernels-before 25 bash -c "git worktree add -f /tmp/srdit-kernels-before $KERNELS_BEFORE >/dev/null &&
    cd /tmp/srdit-kernels-before && python3 bench/kernels.py --batch 32 256 --variants triton --iters 10 \
    --json '$OUT/kernels_before.json'"
run traffic 35 python3 bench/traffic.py --preset sr-dit-b1-256 --batch 256 --variants kernels+cached --top 10 \
    --measure --json "$OUT/traffic_gpu.json"
run data 15 python3 bench/data.py --json "$OUT/data.json"
run sample 15 python3 bench/sample.py --nfe 25 250 --iters 2 --json "$OUT/sample.json"
tail -60 "$LOG"
exit $status
