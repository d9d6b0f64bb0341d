#!/usr/bin/env bash
# Configures the Bazel build for the installed TensorFlow. Non-interactive and idempotent.
#
#   ./configure.sh            # python3 on PATH, or $PYTHON_BIN_PATH
#   ./configure.sh --cuda     # also `bazel build --config=cuda`: the library with GPU kernels (nvcc 13
#                             # from $CUDA_HOME, /usr/local/cuda, PATH or pip; TF_KLD_CUDA_ARCHS)
#
# Writes .bazelrc (flags from tools/build_flags.py, plus what Bazel 4 needs offline) and .bazeliskrc
# (so bazelisk runs the local Bazel instead of downloading one).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

cuda=0
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    --nocuda|--cpu) cuda=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "configure.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

find_python() {
  local candidates=()
  if [[ -n "${PYTHON_BIN_PATH:-}" ]]; then
    candidates=("$PYTHON_BIN_PATH")
  else
    candidates=(python3 python)
  fi
  local py
  for py in "${candidates[@]}"; do
    py="$(command -v "$py" 2>/dev/null)" || continue
    # The interpreter itself (not a pyenv shim), as Python reports it, and its TensorFlow version.
    if TF_CPP_MIN_LOG_LEVEL=3 "$py" -c "import sys, tensorflow as tf; print(sys.executable, tf.__version__)" 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

if ! found="$(find_python)" || [[ -z "$found" ]]; then
  echo "configure.sh: no python with TensorFlow found${PYTHON_BIN_PATH:+ (PYTHON_BIN_PATH=$PYTHON_BIN_PATH)}" >&2
  exit 1
fi
read -r python tf_version <<<"$(tail -n 1 <<<"$found")"

# The real Bazel binary for bazelisk: /usr/bin/bazel is a wrapper script; Debian's real client is bazel-4.
find_bazel() {
  if [[ -n "${BAZEL_REAL:-}" && -x "${BAZEL_REAL}" ]]; then echo "$BAZEL_REAL"; return 0; fi
  local b
  for b in bazel-4 bazel-real bazel; do
    b="$(command -v "$b" 2>/dev/null)" || continue
    b="$(readlink -f "$b")"
    # Skip shell-script wrappers (Debian's /usr/bin/bazel, bazelisk's launchers).
    if head -c 4 "$b" | grep -q $'\x7fELF'; then echo "$b"; return 0; fi
  done
  return 1
}

cuda_flag=()
if [[ $cuda == 1 ]]; then
  cuda_home="$("$python" tools/build_flags.py --cuda-home)" || {
    echo "configure.sh: --cuda: no CUDA toolkit with nvcc found (set CUDA_HOME, or see tools/build_flags.py NVCC_WHEELS)" >&2
    exit 1
  }
  cuda_flag=(--cuda)
fi

flags="$(TF_CPP_MIN_LOG_LEVEL=3 "$python" tools/build_flags.py --bazelrc "${cuda_flag[@]}" 2>/dev/null)" || {
  echo "configure.sh: tools/build_flags.py --bazelrc failed with $python" >&2
  TF_CPP_MIN_LOG_LEVEL=3 "$python" tools/build_flags.py --bazelrc "${cuda_flag[@]}" >/dev/null
  exit 1
}

tmp="$(mktemp .bazelrc.XXXXXX)"
trap 'rm -f "$tmp"' EXIT
{
  echo "$flags"
  echo
  echo "# Repository rules read these; fetch/query/sync do not inherit build options."
  for cmd in fetch query sync; do
    grep '^build --repo_env=' <<<"$flags" | sed "s/^build /$cmd /"
  done
  echo
  echo "# Offline: any download is an immediate error rather than a DNS time-out."
  for cmd in build fetch query sync; do
    echo "$cmd --experimental_repository_disable_download"
  done
  echo "# Debian's /etc/bazel/bazelrc turns sandbox_debug on, which leaves every sandbox behind."
  echo "build --nosandbox_debug"
  if [[ -d /dev/shm && -w /dev/shm ]]; then
    echo "# Each compile's sandbox holds ~20k symlinks to TF's headers: on tmpfs that costs ~1 s, not ~20 s."
    echo "build --experimental_sandbox_base=/dev/shm"
  fi
  echo "# Optimised, with NDEBUG (Eigen's and TF's debug asserts off), like TensorFlow itself."
  echo "build --compilation_mode=opt"
  echo "# A fixed PATH for actions: launching through bazelisk/npx must not invalidate the cache."
  echo "build --incompatible_strict_action_env"
  echo "# No __init__.py files invented in runfiles (they would turn tests/ into a package)."
  echo "build --incompatible_default_to_explicit_init_py"
  echo "test --test_output=errors"
  echo "test --test_env=TF_CPP_MIN_LOG_LEVEL=2"
  echo
  echo "# Personal settings (not tracked)."
  echo "try-import %workspace%/.bazelrc.user"
} >"$tmp"
mv -f "$tmp" .bazelrc
trap - EXIT

if bazel_bin="$(find_bazel)"; then
  printf 'USE_BAZEL_VERSION=%s\n' "$bazel_bin" >.bazeliskrc
else
  echo "configure.sh: no Bazel binary found (apt-get install -y bazel-bootstrap); .bazeliskrc not written" >&2
fi

echo "configure.sh: TensorFlow $tf_version, python $python"
echo "configure.sh: wrote .bazelrc${bazel_bin:+ and .bazeliskrc (bazel: $bazel_bin)}"
if [[ $cuda == 1 ]]; then
  echo "configure.sh: --cuda: nvcc from $cuda_home; bazel build --config=cuda //... adds the GPU kernels"
fi
