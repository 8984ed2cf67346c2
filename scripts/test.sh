#!/usr/bin/env bash
# The test suite (multi-rank tests spawn gloo process groups on CPU). Extra arguments go to pytest:
#   ./scripts/test.sh -k parallel -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
exec python -m pytest "$@"
