#!/bin/bash
# Every GPU check in one go, for a short lease of a machine with a CUDA GPU:
#   MNIST_ROOT=<folder holding MNIST/raw> bash benchmarks/gpu.sh [log folder]   (default: outputs/gpu_check)
# Stages, most important first, each under its own time limit and all under DEADLINE seconds
# (default 540): a stage that runs out is cut and the next one starts with what is left.
#   1. the test suite (every test not pinned to the CPU runs on the GPU; the CUDA-only ones run);
#   2. the population step against its batched math, eager and replayed as one CUDA graph;
#   3. four populations (Adam, widths 8-512, the full budget's data, 2 epochs) one after another,
#      then as four submitit_local jobs at once on the one GPU;
#   4. benchmarks/train_loop.py and benchmarks/optimizer_step.py on CUDA;
#   5. the full-budget map's Adam columns at widths 8 and 2048: 60 runs as populations, 2 sequentially.
# Needs the project installed (`pip install -e ".[dev]"`: the tests call optimlab-report). Full logs in the
# log folder; the tables on stdout. Python is `python3` (PYTHON changes it).
set -u
LOGS=${1:-outputs/gpu_check}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
# limit SECONDS: the smaller of SECONDS and what is left before the deadline (at least 1)
limit() { local left=$(( DEADLINE - ($(date +%s) - T0) )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
seconds_since() { awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $1}"; }
# Ctrl-C stops the stage (timeout --foreground keeps it in the terminal's process group) and then the script;
# out of time, --foreground signals the stage's own process alone: SIGINT for pytest, which stops its workers
trap 'stamp "interrupted"; exit 130' INT TERM

stamp "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, lightning, hydra; print(torch.__version__, lightning.__version__, hydra.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOGS/env.log"
if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  stamp "no CUDA GPU visible to $PY: nothing to measure"; exit 1
fi

stamp "1. test suite"
timeout --foreground -s INT -k 30 "$(limit 200)" $PY -m pytest -q -p no:cacheprovider -n 12 tests > "$LOGS/pytest.log" 2>&1
tail -15 "$LOGS/pytest.log"

stamp "2. population step (30 members 784-32-10)"
timeout --foreground "$(limit 60)" $PY benchmarks/population.py --device cuda --members 30 --hidden 32 --steps 50 --repeats 3 \
    > "$LOGS/population_step.log" 2>&1
tail -4 "$LOGS/population_step.log"

stamp "3. four populations: one after another, then as four submitit_local jobs at once"
FOUR="sweep=regime_map_full optimizer=adam model.hidden=[8],[32],[128],[512] epochs=2 trainer.progress_bar=false"
for executor in inline submitit_local; do
  start=$(date +%s.%N)
  timeout --foreground "$(limit 90)" $PY train.py -m $FOUR hydra.launcher.executor=$executor hydra.launcher.max_parallel=4 \
      hydra.sweep.dir="$LOGS/four_$executor" >> "$LOGS/concurrency.log" 2>&1
  echo "$executor: 120 runs, exit $?, $(seconds_since "$start") s" | tee -a "$LOGS/concurrency.log"
done

stamp "4. training loop and optimizer step"
timeout --foreground "$(limit 90)" $PY benchmarks/train_loop.py --device cuda > "$LOGS/train_loop.log" 2>&1
tail -5 "$LOGS/train_loop.log"
timeout --foreground "$(limit 60)" $PY benchmarks/optimizer_step.py --device cuda > "$LOGS/optimizer_step.log" 2>&1
tail -12 "$LOGS/optimizer_step.log"

stamp "5. full-budget map, Adam at widths 8 and 2048: 60 runs as populations, 2 sequentially"
SLICE="sweep=regime_map_full optimizer=adam trainer.progress_bar=false"
start=$(date +%s.%N)
timeout --foreground "$(limit 150)" $PY train.py -m $SLICE 'model.hidden=[8],[2048]' hydra.sweep.dir="$LOGS/map_slice_population" \
    > "$LOGS/map_slice.log" 2>&1
echo "populations: 60 runs, exit $?, $(seconds_since "$start") s" | tee -a "$LOGS/map_slice.log"
start=$(date +%s.%N)
timeout --foreground "$(limit 100)" $PY train.py -m $SLICE hydra/launcher=basic 'model.hidden=[8],[2048]' lr=0.001 seed=0 \
    hydra.sweep.dir="$LOGS/map_slice_sequential" >> "$LOGS/map_slice.log" 2>&1
echo "sequential: 2 runs, exit $?, $(seconds_since "$start") s" | tee -a "$LOGS/map_slice.log"
stamp "done"
