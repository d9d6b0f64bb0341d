#!/usr/bin/env bash
# Sets up a fresh machine, builds the op in place and runs the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
bash tools/install_deps.sh
bash tools/build_inplace.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec python3 -m pytest tests "$@"
