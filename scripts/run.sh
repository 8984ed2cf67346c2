#!/usr/bin/env bash
# The main job: a short tensor-parallel training of the tiny Llama on CPU (TP=2 over 2 gloo ranks,
# about a minute on 2 cores), then a few lines sampled from it and where its files are.
# Environment overrides and extra arguments (passed on to scripts/train.py), e.g.
#   STEPS=600 ./scripts/run.sh --sequence-parallel
#   NPROC=4 TP=2 ./scripts/run.sh --dp 2
#   RUN_DIR=runs/mine ./scripts/run.sh --resume        # continue a previous run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh

NPROC="${NPROC:-2}"
TP="${TP:-2}"
STEPS="${STEPS:-300}"
RUN_DIR="${RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}"

torchrun --standalone --nproc_per_node "$NPROC" scripts/train.py \
  --preset tiny --tp "$TP" --steps "$STEPS" --seq-len 128 --batch-size 16 --seed 0 \
  --ckpt-dir "$RUN_DIR" --ckpt-every 100 --val-every 50 --metrics "$RUN_DIR/metrics.jsonl" "$@"

echo
python scripts/sample.py --ckpt-dir "$RUN_DIR" --prompt "def " --max-new-tokens 160 --num-samples 3 --temperature 0.7
echo
# train.py printed the paths of the metrics and the loss curve above the samples; one line to end on.
echo "run directory: $RUN_DIR (checkpoints step_*, metrics.jsonl, metrics.png)"
