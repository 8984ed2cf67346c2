#!/usr/bin/env bash
# The main job: check a sharded FFN against the dense one on NPROC ranks under torchrun
# (gloo on CPU, NCCL when CUDA is available). Extra arguments go to scripts/parity.py, e.g.
#   ./scripts/run.sh --bias --sequence-parallel --activation gelu
#   NPROC=4 ./scripts/run.sh --hidden-dim 11008 --dim 4096
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
exec torchrun --standalone --nproc_per_node "${NPROC:-2}" scripts/parity.py "$@"
