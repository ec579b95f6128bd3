#!/bin/bash
# Every GPU check in one go, for a short lease of a machine with a CUDA GPU:
#   MNIST_ROOT=<folder holding MNIST/raw> bash benchmarks/gpu.sh [log folder]   (default: outputs/gpu_check)
# Stages, each under its own time limit (a stage that runs out is cut, the next one starts):
# the test suite; the population step against its batched math, eager and as one CUDA graph; the
# full-budget map's Adam columns at widths 8 and 2048 as populations and two of its runs
# sequentially; four populations one after another and as four submitit_local jobs at once; the
# training loop and optimizer step benchmarks. Full logs in the log folder; the tables on stdout.
# Python is `python3` (set PYTHON to change it); about 9 minutes on one H200.
set -u
LOGS=${1:-outputs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
seconds() { awk "BEGIN{printf \"%.1f\", $2 - $1}"; }

stamp "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, lightning, hydra; print(torch.__version__, lightning.__version__, hydra.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOGS/env.log"

stamp "population step (30 members 784-32-10)"
timeout 90 $PY benchmarks/population.py --device cuda --members 30 --hidden 32 --steps 50 --repeats 3 \
    > "$LOGS/population_step.log" 2>&1
tail -4 "$LOGS/population_step.log"

stamp "full-budget map, Adam at widths 8 and 2048: 60 runs as populations, 2 sequentially"
SLICE="sweep=regime_map_full optimizer=adam trainer.progress_bar=false"
start=$(date +%s.%N)
timeout 150 $PY train.py -m $SLICE 'model.hidden=[8],[2048]' hydra.sweep.dir="$LOGS/map_slice_population" \
    > "$LOGS/map_slice.log" 2>&1
echo "populations: 60 runs in $(seconds "$start" "$(date +%s.%N)") s" | tee -a "$LOGS/map_slice.log"
start=$(date +%s.%N)
timeout 100 $PY train.py -m $SLICE hydra/launcher=basic 'model.hidden=[8],[2048]' lr=0.001 seed=0 \
    hydra.sweep.dir="$LOGS/map_slice_sequential" >> "$LOGS/map_slice.log" 2>&1
echo "sequential: 2 runs in $(seconds "$start" "$(date +%s.%N)") s" | tee -a "$LOGS/map_slice.log"

stamp "four populations (Adam, widths 8-512, 2 epochs): inline, then as four submitit_local jobs at once"
FOUR="sweep=regime_map_full optimizer=adam model.hidden=[8],[32],[128],[512] epochs=2 trainer.progress_bar=false"
for executor in inline submitit_local; do
  start=$(date +%s.%N)
  timeout 120 $PY train.py -m $FOUR hydra.launcher.executor=$executor hydra.launcher.max_parallel=4 \
      hydra.sweep.dir="$LOGS/four_$executor" >> "$LOGS/concurrency.log" 2>&1
  echo "$executor: 120 runs in $(seconds "$start" "$(date +%s.%N)") s" | tee -a "$LOGS/concurrency.log"
done

stamp "training loop and optimizer step"
timeout 90 $PY benchmarks/train_loop.py --device cuda > "$LOGS/train_loop.log" 2>&1
tail -5 "$LOGS/train_loop.log"
timeout 60 $PY benchmarks/optimizer_step.py --device cuda > "$LOGS/optimizer_step.log" 2>&1
tail -12 "$LOGS/optimizer_step.log"

stamp "test suite"
timeout 240 $PY -m pytest -q -p no:cacheprovider -n 12 tests > "$LOGS/pytest.log" 2>&1
tail -15 "$LOGS/pytest.log"
stamp "done"
