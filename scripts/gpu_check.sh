#!/usr/bin/env bash
# Moved to benchmarks/gpu_check.sh; this path runs it, with the same arguments.
exec "$(dirname "${BASH_SOURCE[0]}")/../benchmarks/gpu_check.sh" "$@"
