#!/usr/bin/env bash
# Sourced by run.sh, test.sh and the Docker images: make sure .venv exists and holds torch and this
# package (with its test extras). Idempotent: when nothing changed since the last install it only
# checks a stamp.
#
# Which torch (release TORCH_VERSION, default 2.13.0):
#   - TORCH_SPEC, when set: pip arguments that install torch, used as they are, e.g.
#       TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
#   - on Linux without an NVIDIA GPU: PyTorch's CPU build (about 200 MB) from TORCH_CPU_INDEX
#     (default https://download.pytorch.org/whl/cpu) when that index answers within 3 seconds;
#   - otherwise torch==TORCH_VERSION from pip's configured index. From PyPI on Linux x86_64 that
#     is the CUDA 13.0 build, which brings several GB of NVIDIA libraries; on macOS and Windows it
#     is the CPU build. (The development machines' pip finds a CPU wheel of 2.13.0 in a local
#     directory first: `pip config list` shows it.)
# `bash scripts/bootstrap.sh --print-torch-spec` prints the choice and installs nothing.
#
# Other overrides: PYTHON, the interpreter that creates the venv (default: python3); VENV, where the
# venv lives (default: <repo>/.venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

_tp_ffn_has_nvidia_gpu() {
  [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; }
}

# True when URL answers a HEAD request with success within 3 seconds, DNS included (a thread with a
# deadline: urllib's own timeout does not cover name resolution).
_tp_ffn_answers() {
  "$PYTHON" - "$1" <<'EOF'
import sys, threading, urllib.request
ok = []
def probe():
    try:
        with urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=3):
            ok.append(True)
    except Exception:
        pass
t = threading.Thread(target=probe, daemon=True)
t.start()
t.join(3)
sys.exit(0 if ok else 1)
EOF
}

# Prints the pip arguments for torch; says on stderr where they come from.
# --index-url, not --extra-index-url: with both indexes pip takes the newest matching release from
# either, so a range, or a Python the CPU index has no wheel for, silently brings PyPI's CUDA build
# (tests/project/test_bootstrap.py shows pip doing it). With --index-url a missing wheel is an error.
_tp_ffn_torch_spec() {
  local why
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "bootstrap: torch from TORCH_SPEC" >&2
    echo "$TORCH_SPEC"
    return
  elif [ "$(uname -s)" != Linux ]; then
    why="not Linux"
  elif _tp_ffn_has_nvidia_gpu; then
    why="NVIDIA GPU found"
  elif ! _tp_ffn_answers "${TORCH_CPU_INDEX%/}/torch/"; then
    why="no NVIDIA GPU, but $TORCH_CPU_INDEX did not answer"
  else
    echo "bootstrap: no NVIDIA GPU: torch $TORCH_VERSION, CPU build, from $TORCH_CPU_INDEX" >&2
    echo "torch==$TORCH_VERSION --index-url $TORCH_CPU_INDEX"
    return
  fi
  echo "bootstrap: $why: torch $TORCH_VERSION from pip's configured index" \
    "(PyPI's wheel for Linux x86_64 is the CUDA build, several GB)" >&2
  echo "torch==$TORCH_VERSION"
}

if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = "--print-torch-spec" ]; then
  _tp_ffn_torch_spec
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.tp_ffn-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) ${TORCH_SPEC:-torch==$TORCH_VERSION (chosen for this machine)}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  _tp_ffn_pip() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
  spec="$(_tp_ffn_torch_spec)"
  echo "bootstrap: installing $spec and tp_ffn[test] into $VENV" >&2
  # torch first and pinned: an unpinned torch (asked for by tp_ffn or fairscale) would pull the
  # CUDA build; once this one is installed, their 'torch>=' requirements are satisfied.
  # shellcheck disable=SC2086  # the spec may carry several pip arguments
  if ! _tp_ffn_pip $spec; then
    if [ -n "${TORCH_SPEC:-}" ] || [ "$spec" = "torch==$TORCH_VERSION" ]; then exit 1; fi
    echo "bootstrap: that failed; torch $TORCH_VERSION from pip's configured index instead" >&2
    _tp_ffn_pip "torch==$TORCH_VERSION"
  fi
  _tp_ffn_pip -e "$ROOT[test]"
  "$VENV/bin/python" -c 'import torch; print(f"bootstrap: torch {torch.__version__}, " + (f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"))' >&2
  echo "$want" > "$stamp"
fi

export PATH="$VENV/bin:$PATH"
# One BLAS thread per rank unless told otherwise: several ranks share this machine's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
