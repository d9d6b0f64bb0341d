#!/usr/bin/env bash
# Proves the pip build: a wheel with the library inside, and an install that works from any directory.
set -euo pipefail
cd "$(dirname "$0")/.."
TF_KLD_ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m pip wheel --disable-pip-version-check -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/tf_kld-*.whl)
"$PYTHON" -c 'import sys, zipfile; sys.exit("tf_kld/_kld_ops.so" not in zipfile.ZipFile(sys.argv[1]).namelist())' \
  "$wheel" || { echo "pip_ci: the wheel lacks tf_kld/_kld_ops.so"; exit 1; }
echo "pip_ci: $(basename "$wheel") holds tf_kld/_kld_ops.so"

# A fresh virtualenv that sees $PYTHON's packages (a .pth file naming its site-packages) but not
# this checkout; with a second argument, TensorFlow is reached through a link of its own.
new_env() {
  local dir=$1 first_site site
  "$PYTHON" -m venv "$dir"
  first_site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$first_site" > "$site/tf_kld_ci_first_env.pth"
  if [[ ${2:-} == own-tensorflow ]]; then ln -s "$first_site/tensorflow" "$site/tensorflow"; fi
}

new_env "$work/venv"
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

# A checkout built in place for one TensorFlow, installed into an environment whose TensorFlow lives
# elsewhere: pip must build a library for that TensorFlow (setup.py's stamp), not reuse the in-place
# one. The second environment reaches the first one's packages through a .pth file, with its own
# path to TensorFlow (a link in its site-packages), so tf.sysconfig names other include/lib dirs.
cd "$TF_KLD_ROOT"
bash tools/build_inplace.sh
other=$work/other
new_env "$other" own-tensorflow
other_site=$("$other/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$other/bin/python" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps .
cd "$work"
"$other/bin/python" - "$other_site" <<'PY'
import os, subprocess, sys, warnings
warnings.simplefilter("error")
import tensorflow as tf
import tf_kld
site = sys.argv[1]
lib = os.path.join(os.path.dirname(tf_kld.__file__), "_kld_ops.so")
assert tf_kld.__file__.startswith(site), tf_kld.__file__
assert tf.sysconfig.get_lib().startswith(site), tf.sysconfig.get_lib()
runpath = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
runpath = [l for l in runpath.splitlines() if "RUNPATH" in l or "RPATH" in l]
assert runpath and tf.sysconfig.get_lib() in runpath[0], (runpath, tf.sysconfig.get_lib())
assert tf_kld.custom_op_loaded(), tf_kld.ops.load_error()
print(f"pip_ci: installed into a second environment, the library links against its TensorFlow "
      f"({tf.sysconfig.get_lib()})")
PY
