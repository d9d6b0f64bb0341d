#!/usr/bin/env bash
# Builds the op library into tf_kld/_kld_ops.so of this checkout (skipped when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
${PYTHON:-python3} setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(copying|running)" || true
test -f tf_kld/_kld_ops.so
