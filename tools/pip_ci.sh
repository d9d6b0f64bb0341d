#!/usr/bin/env bash
# Proves the pip build: a wheel with the library inside, and an install that works from any directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m pip wheel --disable-pip-version-check -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/tf_kld-*.whl)
"$PYTHON" -c 'import sys, zipfile; sys.exit("tf_kld/_kld_ops.so" not in zipfile.ZipFile(sys.argv[1]).namelist())' \
  "$wheel" || { echo "pip_ci: the wheel lacks tf_kld/_kld_ops.so"; exit 1; }
echo "pip_ci: $(basename "$wheel") holds tf_kld/_kld_ops.so"

# A fresh environment that sees the machine's TensorFlow but not this checkout.
"$PYTHON" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps .
cd "$work"
TF_KLD_CHECKOUT=$(cd - >/dev/null && pwd) "$work/venv/bin/python" - <<'PY'
import os, warnings
warnings.simplefilter("error")  # a library that fails to load warns: make that fatal here
import tf_kld
assert tf_kld.custom_op_loaded(), tf_kld.ops.load_error()
assert "site-packages" in tf_kld.__file__, tf_kld.__file__
assert not tf_kld.__file__.startswith(os.environ["TF_KLD_CHECKOUT"]), tf_kld.__file__
value = float(tf_kld.KLD([.4, .9, .2], [.5, .8, .12]))
assert abs(value - 0.11891246) < 1e-7, value
print(f"pip_ci: installed tf_kld from {os.path.dirname(tf_kld.__file__)} runs the custom op: {value:.8f}")
PY
