#!/usr/bin/env bash
# Sets up the project virtualenv (.venv; PYTHON=... picks another interpreter), builds the op in
# place and runs the test suite (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
source tools/python_env.sh
bash tools/build_inplace.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$PYTHON" -m pytest tests "$@"
