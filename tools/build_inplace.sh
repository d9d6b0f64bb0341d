#!/usr/bin/env bash
# Builds the op library into tf_kld/_kld_ops.so of this checkout with $PYTHON (default python3);
# skipped when up to date for that interpreter's TensorFlow (setup.py keeps a stamp beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
# Dropped: setuptools' chatter and the start-up lines TensorFlow prints when setup.py reads its flags.
noise='^(copying|running) |^WARNING: All log messages before absl|^I0000 .*(port|cudart_stub|cpu_feature_guard)\.cc|^E0000 .*cuInit|^To enable the following instructions'
"${PYTHON:-python3}" setup.py -q build_ext --inplace 2>&1 | grep -v -E "$noise"
status=${PIPESTATUS[0]}
[[ $status == 0 ]] || { echo "tf_kld: the build failed (exit $status)" >&2; exit "$status"; }
test -f tf_kld/_kld_ops.so
