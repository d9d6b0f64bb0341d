#!/usr/bin/env bash
# Sets up a fresh machine, builds the op, runs the demo and the benchmark table.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/install_deps.sh
bash tools/build_inplace.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
python3 examples/demo.py
python3 bench/bench.py "$@"
