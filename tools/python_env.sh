# Sourced by run.sh, test.sh and .ci/run: chooses the interpreter tf_kld builds and runs with and
# installs what it needs there. PYTHON=/path/to/python uses that interpreter (packages are installed
# into it where missing); by default it is the project virtualenv .venv (created on first use), so
# nothing is installed into the system's Python.
_tf_kld_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$_tf_kld_root/.venv/bin/python"
  if [[ ! -x "$PYTHON" ]]; then
    echo "tf_kld: creating the project virtualenv $_tf_kld_root/.venv (python3 -m venv)"
    python3 -m venv "$_tf_kld_root/.venv"
  fi
fi
export PYTHON
bash "$_tf_kld_root/tools/install_deps.sh"
