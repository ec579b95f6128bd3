#!/usr/bin/env bash
# Screenshots of TensorBoard's Time Series, HPARAMS and Text tabs for docs/figures/, taken by a
# headless Chromium (Debian's `chromium` package) from a short sweep of three regimes.
#   docs/screenshots.sh [runs folder]   (default: a fresh sweep in a temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-}"
if [ -z "$runs" ]; then
    runs="$(mktemp -d)/sweep"
    python train.py -m experiment=baseline,oscillating,diverging epochs=3 data.subset=10000 \
        curvature.every_n_steps=20 trainer.progress_bar=false "hydra.sweep.dir=$runs" \
        'hydra.sweep.subdir=${hydra.job.num}_${name}' > /dev/null
fi
port=6123
tensorboard --logdir "$runs" --port "$port" --host 127.0.0.1 > /dev/null 2>&1 &
board=$!
trap 'kill $board' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/" > /dev/null && break; sleep 1; done
shoot() {  # shoot <tab> <file>
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1000 \
        --virtual-time-budget=60000 --screenshot="docs/figures/$2" "http://127.0.0.1:$port/#$1" 2> /dev/null
}
shoot timeseries tensorboard_time_series.png
shoot hparams tensorboard_hparams.png
shoot text tensorboard_text.png
