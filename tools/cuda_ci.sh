#!/usr/bin/env bash
# CI for the CUDA build on a machine without a GPU (nvcc 13 needed, see tools/build_flags.py):
#   1. the library with GPU kernels for one architecture (TF_KLD_CUDA_ARCHS, default 80-real), built
#      with pip's setup.py into a temporary directory (never over tf_kld/_kld_ops.so);
#   2. the standalone harness built with nvcc in both variants (CUDA 13's runtime static, and linked
#      against TensorFlow's libcudart.so.12, pip-installed once if TensorFlow's is not there), and
#      the checks of each that need no GPU (the float64 reference itself, the Divider, the launch
#      plans, and a CPU replay of every checked launch); with TF_KLD_CUDA_COMPILER=clang (the clang
#      build of the library) also the harness's clang variant;
#   3. tests/test_cuda_build.py on them: GPU kernels registered for the KL and the distillation ops
#      and every dtype (the distillation kernels' device code in the fatbinary), the
#      driver gate (no GPU kernels, one warning, for a stand-in machine with GPUs and an old
#      driver), tf_kld.gpu_info(), no CUDA runtime linked, no Eigen:: or tf_kld::gpu:: symbols
#      exported, loads without a GPU, CPU results bit-identical to the CPU-only library's, and the
#      harness variants linked as intended;
#   4. with --bazel, the library through ./configure.sh --cuda && bazel build --config=cuda (clean
#      output base, offline) and the same tests, then .bazelrc is rewritten for the CPU build again.
#
#   bash tools/cuda_ci.sh [--bazel]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export TF_CPP_MIN_LOG_LEVEL=2
archs=${TF_KLD_CUDA_ARCHS:-80-real}
# TF_KLD_CUDA_COMPILER=clang: the clang build (README's CUDA section), whose device code needs a
# driver for CUDA 12.0 rather than nvcc 13's 13.0; the harness then also gets its clang variant.
harness_flags=(--self-test)
if [[ ${TF_KLD_CUDA_COMPILER:-nvcc} == clang ]]; then
  export TF_KLD_CUDA_NEEDED_DRIVER=12000
  harness_flags+=(--clang)
  # ptxas 12.5: where tools/cuda_harness.sh would install it, so that both use one copy.
  if [[ -z ${TF_KLD_CUDA12_NVCC_DIR:-} ]] && ! "$PYTHON" -c 'import nvidia.cuda_nvcc' 2>/dev/null; then
    export TF_KLD_CUDA12_NVCC_DIR=$PWD/build/cuda_harness/cuda12_nvcc
    [[ -x $TF_KLD_CUDA12_NVCC_DIR/nvidia/cuda_nvcc/bin/ptxas ]] ||
      "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --target "$TF_KLD_CUDA12_NVCC_DIR" \
        "$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags
print(*build_flags.CLANG_CUDA_WHEELS)')"
  fi
fi
bazel=0
for arg in "$@"; do
  case "$arg" in
    --bazel) bazel=1 ;;
    *) echo "cuda_ci.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/tf_kld_cuda.XXXXXX")
cleanup() {
  if [[ -d $work/bazel ]]; then
    bazel --output_base="$work/bazel" shutdown >/dev/null 2>&1 || true
    chmod -R u+w "$work/bazel" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

log() { printf '\n=== %s\n' "$*"; }

log "CPU-only library (the comparison)"
bash tools/build_inplace.sh

log "pip build with CUDA kernels for $archs"
start=$SECONDS
TF_KLD_CUDA=1 TF_KLD_CUDA_ARCHS=$archs "$PYTHON" setup.py -q build_ext --build-lib "$work/lib" 2>&1 \
  | grep -v -E "^(copying|running)" || true
library=$work/lib/tf_kld/_kld_ops.so
test -f "$library"
log "pip CUDA build took $((SECONDS - start)) s"

log "CUDA harness: nvcc build for $archs (both runtimes) and the checks that need no GPU"
rm -f build/cuda_harness/harness_clang  # only what this run builds is checked
TF_KLD_CUDA_ARCHS=$archs bash tools/cuda_harness.sh "${harness_flags[@]}"
export TF_KLD_CUDA_HARNESS_DIR=$PWD/build/cuda_harness

TF_KLD_CUDA_LIBRARY=$library "$PYTHON" -m pytest tests/test_cuda_build.py -q -p no:cacheprovider

if [[ $bazel == 1 ]]; then
  log "Bazel build with CUDA kernels for $archs (clean output base)"
  start=$SECONDS
  TF_KLD_CUDA_ARCHS=$archs ./configure.sh --cuda
  status=0
  bazel --output_base="$work/bazel" build --symlink_prefix=/ --config=cuda //:tf_kld/_kld_ops.so || status=$?
  ./configure.sh >/dev/null  # back to the CPU configuration
  [[ $status == 0 ]] || exit "$status"
  bazel_library=$work/bazel/execroot/tf_kld_repo/bazel-out/k8-opt/bin/tf_kld/_kld_ops.so  # --compilation_mode=opt
  test -f "$bazel_library"
  log "Bazel CUDA build took $((SECONDS - start)) s"
  TF_KLD_CUDA_LIBRARY=$bazel_library "$PYTHON" -m pytest tests/test_cuda_build.py -q -p no:cacheprovider
fi
log "OK"
