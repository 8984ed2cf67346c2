#!/usr/bin/env bash
# One call on a machine with a CUDA device: tp_ffn's CUDA tests, parity on NCCL and on one GPU through
# gloo, the FFN benchmark at Llama-3-8B / Llama-2-70B shapes (eager and compiled), one rank's compute
# at TP 2-8 on the fake process group, and a short bf16 training run; within 8 minutes on one H200.
#
#   benchmarks/gpu_check.sh OUT_DIR [--parts tests,parity,...] [--deadline SECONDS] [--rehearse-on-cpu]
#
# Nothing is installed: it runs the python3 on PATH ($PYTHON to choose another) with this repository on
# PYTHONPATH; fairscale is used when present. Writes OUT_DIR/gpu_check.{json,md,log}. Without a CUDA
# device it says so, writes a summary saying so and exits 0. See benchmarks/gpu_check.py for the parts.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: no '$PY' on PATH (set PYTHON to a Python 3 with torch)" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The driver keeps its own deadline (420 s by default); this is the backstop for a hang in the driver
# itself, and with its 10 s of grace still under 8 minutes.
exec timeout --kill-after=10 450 "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
