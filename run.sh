#!/usr/bin/env bash
# Sets up the project virtualenv (.venv; PYTHON=... picks another interpreter), builds the op, runs
# the demo and the benchmark tables (extra args go to bench/bench.py; results in bench/out/).
set -euo pipefail
cd "$(dirname "$0")"
source tools/python_env.sh
bash tools/build_inplace.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

# On a machine without an NVIDIA GPU, TensorFlow's start-up probe for one prints lines that read like
# failures (E... failed call to cuInit); they are dropped here, with the lines TensorFlow 2.21 logs at
# start-up whatever TF_CPP_MIN_LOG_LEVEL says (oneDNN on, absl not initialised, oneDNN's float16
# fallback); everything else on stderr stays.
quiet() {
  if [[ -e /dev/nvidiactl ]]; then
    "$@"
  else
    "$@" 2> >(grep --line-buffered -v -E 'cudart_stub\.cc.*Could not find cuda drivers|failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|oneDNN custom operations are on|All log messages before absl::InitializeLog|oneDNN supports DT_HALF only' >&2)
  fi
}
quiet "$PYTHON" examples/demo.py
quiet "$PYTHON" examples/distillation_demo.py
quiet "$PYTHON" examples/linear_distillation_demo.py
quiet "$PYTHON" bench/bench.py "$@"
quiet "$PYTHON" bench/distill_bench.py --quick   # the issue's shapes: bench/distill_bench.py
quiet "$PYTHON" bench/linear_bench.py            # the issue's shapes: --full
