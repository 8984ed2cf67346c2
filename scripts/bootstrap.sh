#!/usr/bin/env bash
# Sourced by run.sh and test.sh: make sure .venv exists and holds torch and this package (with its
# test extras). Idempotent: when nothing changed since the last install it only checks a stamp.
#
# Environment overrides:
#   PYTHON       interpreter that creates the venv          (default: python3)
#   VENV         where the venv lives                       (default: <repo>/.venv)
#   TORCH_SPEC   pip arguments that install torch           (default: torch==2.13.0, a CPU build)
#                e.g. TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.tp_ffn-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing torch ($TORCH_SPEC) and tp_ffn[test] into $VENV" >&2
  # torch first and pinned: an unpinned torch (asked for by tp_ffn or fairscale) would pull a
  # multi-GB CUDA build; once this one is installed, their 'torch>=' requirements are satisfied.
  # shellcheck disable=SC2086  # TORCH_SPEC may carry several pip arguments
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $TORCH_SPEC
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
  echo "$want" > "$stamp"
fi

export PATH="$VENV/bin:$PATH"
# One BLAS thread per rank unless told otherwise: several ranks share this machine's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
