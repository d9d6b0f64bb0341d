#!/usr/bin/env bash
# Installs what building and testing tf_kld needs (idempotent; quick when all is there).
set -euo pipefail
PYTHON=${PYTHON:-python3}
TF_VERSION=${TF_KLD_TF_VERSION:-2.21.0}

need=()
"$PYTHON" -c "import tensorflow as tf, sys; sys.exit(tf.__version__ != '$TF_VERSION')" 2>/dev/null \
  || need+=("tensorflow==$TF_VERSION")
for mod in pytest hypothesis matplotlib numpy setuptools wheel; do
  "$PYTHON" -c "import $mod" 2>/dev/null || need+=("$mod")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "tf_kld: installing ${need[*]}"
  "$PYTHON" -m pip install --disable-pip-version-check -q "${need[@]}"
fi
if ! command -v g++ >/dev/null; then
  apt-get update -q && apt-get install -y -q g++
fi
