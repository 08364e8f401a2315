#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run, sized to fit a short lease on one card (about 5 minutes on an
# H200; the steps' own limits allow 12):
#   1. JEM's paper-scale SGLD image-steps/s and training steps/s with each speed option (benchmarks/sgld_gpu.py);
#   2. the throughput suite (`bench run suite=throughput device=cuda`; give it a BENCH_CACHE holding the
#      suite's checkpoints, trained anywhere: the cache key has no device in it, so it only samples);
#   3. the paper-scale smoke of the hybrid suite (`scale=paper smoke=20`), every model's paper recipe on the GPU;
#   4. the torch.compile cases last (their compilation takes minutes).
# Each step has its own time limit, so one that fails or hangs leaves the others' figures.
#
#   benchmarks/gpu_check.sh OUTDIR      (writes OUTDIR/gpu_check.log, sgld.json, compile.json, records.tgz)
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out" "$out/runs"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1
step() { echo "== $* ($(date -u +%T))" | tee -a "$log"; }
step gpu
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$log"
step sgld_gpu
timeout 200 python3 benchmarks/sgld_gpu.py --out "$out/sgld.json" 2>&1 | tee -a "$log"
step throughput
timeout 150 python3 -m bench run suite=throughput device=cuda yes=true out="$out/runs" 2>&1 | grep -v "^train " | tee -a "$log"
step paper smoke
timeout 120 python3 -m bench run suite=hybrid scale=paper smoke=20 device=cuda yes=true out="$out/runs" 2>&1 \
  | grep -v "^train " | tee -a "$log"
tar czf "$out/records.tgz" -C "$out/runs" . && rm -rf "$out/runs"
step compile
timeout 240 python3 benchmarks/sgld_gpu.py --only compile --out "$out/compile.json" 2>&1 | tee -a "$log"
step done
