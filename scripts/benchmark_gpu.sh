#!/usr/bin/env bash
# The GPU rows of the README's "Measured" tables: scripts/benchmark_icl.py on CUDA for Hiera-tiny and
# Hiera-base+ at 512 and 1024, ours in fp32 and bf16 against Meta's SAM2VideoPredictor (fp32), plus
# Hiera-tiny at 512 over 16, 64 and 256 slices for peak GPU memory against depth.
#
#   bash scripts/benchmark_gpu.sh [OUT_DIR]      # default OUT_DIR: outputs/benchmark_gpu
#
# Each run is bounded (timeout) and one failure does not stop the others. Writes OUT_DIR/log.txt
# (every table) and OUT_DIR/icl_cuda.jsonl (one JSON record per run). Needs a CUDA device; the
# Python on PATH (or $PYTHON) must import torch, sam2 and model_core.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/benchmark_gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
: > "$out/icl_cuda.jsonl"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1

run() {  # run SECONDS ARGS...: one benchmark_icl run, its table to the log, its JSON record to the jsonl
  local limit=$1
  shift
  echo "=== benchmark_icl.py $*" | tee -a "$out/log.txt"
  timeout "$limit" "$py" scripts/benchmark_icl.py --device cuda "$@" > "$out/run.txt" 2>&1
  local rc=$?
  tail -n 25 "$out/run.txt" >> "$out/log.txt"
  grep '^{' "$out/run.txt" | tail -n 1 >> "$out/icl_cuda.jsonl"
  [ $rc -eq 0 ] || echo "exit $rc" | tee -a "$out/log.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/log.txt"
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/log.txt"

for preset in sam2.1_hiera_tiny sam2.1_hiera_base_plus; do
  for size in 512 1024; do
    for precision in fp32 bf16; do
      run 150 --preset "$preset" --image_size "$size" --precision "$precision" \
        --depth 64 --support 4 --objects 2 --warmup 1 --repeats 2
    done
  done
done
for depth in 16 256; do  # 64 is above
  run 150 --preset sam2.1_hiera_tiny --image_size 512 --precision fp32 --depth "$depth" --support 4 --objects 2 \
    --warmup 1 --repeats 2
done
rm -f "$out/run.txt"
