#!/usr/bin/env bash
# The GPU rows of the README's "Measured" tables, in one bounded run:
#
#   compiled  ours compiled as sam2's vos_optimized (--compile max-autotune, bf16) against Meta's predictor built
#             with vos_optimized=True (bf16 autocast, as sam2's benchmark.py), Hiera-tiny at 512, 16/64/256 slices:
#             slices/s and peak GPU memory (scripts/benchmark_icl.py)
#   training  300 steps of the bundle's train.json, Hiera-tiny at 512, bf16 autocast, the bundle's episode
#             sizes: steps/s and peak GPU memory (scripts/benchmark_training.py)
#   eager     ours uncompiled in fp32 and bf16 against SAM2VideoPredictor (fp32), Hiera-tiny and base+ at 512
#             and 1024, 64 slices, and Hiera-tiny at 16 and 256 slices (the earlier table)
#
#   bash scripts/benchmark_gpu.sh [OUT_DIR]                    # default OUT_DIR: outputs/benchmark_gpu
#   SECTIONS="compiled training" bash scripts/benchmark_gpu.sh  # only some sections (default: all three)
#   COMPILE_MODE=reduce-overhead ...                            # ours in another torch.compile mode (Meta's stays
#                                                              # max-autotune, as vos_optimized fixes it)
#   SMOKE=1 bash scripts/benchmark_gpu.sh /tmp/smoke           # CPU-sized check of the same commands (tiny
#                                                              # preset at 64 px, torch.compile's eager backend)
#
# Each run is bounded (timeout) and one failure does not stop the others. Writes OUT_DIR/log.txt (every table),
# OUT_DIR/icl.jsonl (one JSON record per benchmark_icl run and depth) and OUT_DIR/training.json. Expected time on
# an H200 (estimates, not measured): compiled 5 to 9 minutes (both sides compile in max-autotune in the warm-up;
# bounded at 540 s), training 2 to 5 (bounded at 300 s), eager 10 to 20. Needs a CUDA device (except SMOKE=1); the
# Python on PATH (or $PYTHON) must import torch, sam2 and model_core.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/benchmark_gpu}
py=${PYTHON:-python3}
sections=${SECTIONS:-compiled training eager}
mkdir -p "$out"
: > "$out/icl.jsonl"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1

if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu
  model=(--preset tiny --image_size 64)
  depths="4"
  compiled=(--compile max-autotune --compile_backend eager --reference vos --encoder_batch_size 2)
  timing=(--warmup 0 --repeats 1)
  training=(--preset tiny --image_size 64 --steps 3 --warmup 1 --volumes 2 --depth 12)
  compiled_limit=1800 training_limit=1800
else
  device=cuda
  model=(--preset sam2.1_hiera_tiny --image_size 512)
  depths="16,64,256"
  compiled=(--compile "${COMPILE_MODE:-max-autotune}" --reference vos)
  timing=(--warmup 2 --repeats 3)
  training=(--preset sam2.1_hiera_tiny --image_size 512 --steps 300 --warmup 20)
  compiled_limit=540 training_limit=300  # each section fits one 10-minute device call
fi

run() {  # run SECONDS ARGS...: one benchmark_icl run, its tables to the log, its JSON records to the jsonl
  local seconds=$1
  shift
  echo "=== benchmark_icl.py $*" | tee -a "$out/log.txt"
  timeout "$seconds" "$py" scripts/benchmark_icl.py --device "$device" "$@" > "$out/run.txt" 2>&1
  local rc=$?
  grep -v -i 'warn' "$out/run.txt" | grep -v '^{' | tail -n 40 >> "$out/log.txt"
  grep '^{' "$out/run.txt" >> "$out/icl.jsonl"
  [ $rc -eq 0 ] || echo "exit $rc" | tee -a "$out/log.txt"
}

if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/log.txt"
fi
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() \
else open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].split('\n')[0].strip())" | tee -a "$out/log.txt"

for section in $sections; do
  case $section in
    compiled)  # every depth in one process: each side compiles once
      run "$compiled_limit" "${model[@]}" --precision bf16 --reference_precision bf16 "${compiled[@]}" --depth "$depths" \
        --support 4 --objects 2 "${timing[@]}"
      ;;
    training)
      echo "=== benchmark_training.py ${training[*]}" | tee -a "$out/log.txt"
      timeout "$training_limit" "$py" scripts/benchmark_training.py --device "$device" --precision bf16 "${training[@]}" \
        --output "$out/training.json" 2>&1 | grep -v -i 'warn' | tail -n 8 >> "$out/log.txt"
      ;;
    eager)
      if [ "${SMOKE:-0}" = 1 ]; then
        run "$compiled_limit" "${model[@]}" --precision bf16 --depth 4 --support 2 --objects 1 "${timing[@]}"
        continue
      fi
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
      ;;
    *)
      echo "unknown section $section (compiled, training, eager)" | tee -a "$out/log.txt"
      ;;
  esac
done
rm -f "$out/run.txt"
