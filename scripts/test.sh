#!/usr/bin/env bash
# The test suite (multi-rank tests spawn gloo process groups on CPU). Extra arguments go to pytest:
#   ./scripts/test.sh -k parallel -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh

# transformers 5 for tests/hf/test_transformers5.py, which runs the HF adapter's tests again with it first on
# sys.path. Installed apart (pip --target), so the venv keeps 4.46.3; a failed install fails that test alone.
hf5="$VENV/hf5"
hf5_req="tests/hf5-requirements.txt"
hf5_want="$(sha256sum "$hf5_req" | cut -d' ' -f1)"
if [ "$(cat "$hf5/.tp_ffn-installed" 2>/dev/null)" != "$hf5_want" ]; then
  rm -rf "$hf5"
  echo "test.sh: installing $hf5_req into $hf5" >&2
  if python -m pip install --quiet --disable-pip-version-check --target "$hf5" -r "$hf5_req"; then
    echo "$hf5_want" > "$hf5/.tp_ffn-installed"
  else
    echo "test.sh: that failed; tests/hf/test_transformers5.py will say so" >&2
  fi
fi

exec python -m pytest "$@"
