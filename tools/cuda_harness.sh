#!/usr/bin/env bash
# Builds the standalone CUDA harness (bench/cuda/harness.cu: the kernel core, no TensorFlow) with nvcc
# and runs it: the CPU-side self-test, the GPU checks against a float64 reference, and the benchmark
# (GB/s against a device-to-device copy), written to bench/out/cuda_harness.{json,csv}. If
# PyTorch with CUDA is importable, bench/cuda/torch_peers.py then times torch.nn.functional.kl_div
# (eager and torch.compile) on the same GPU and shapes and writes bench/out/cuda_peers.{json,md}.
#
# Two variants are built from the same source:
#   build/cuda_harness/harness          CUDA 13's runtime linked statically;
#   build/cuda_harness/harness_cudart12 linked with -cudart none against TensorFlow's own
#       libcudart.so.12 (the runtime the op library uses at run time, through TensorFlow: nvcc 13
#       device code registered by CUDA 12.5's runtime). The library comes from the installed
#       nvidia-cuda-runtime-cu12 (tensorflow[and-cuda]) or, failing that, is pip-installed with
#       --target into build/cuda_harness/cudart12 (CUDART12_WHEEL); TF_KLD_CUDART12_DIR overrides.
# On a GPU both run the checks (the cudart12 one writes bench/out/cuda_harness_cudart12.*).
# --clang adds a third, build/cuda_harness/harness_clang: the device code built as the clang build of
# the library builds it (clang -> PTX -> ptxas 12.5, tools/build_flags.py --clang-command), linked
# against libcudart.so.12; ptxas 12.5 is pip-installed with --target (nvidia-cuda-nvcc-cu12) when
# TF_KLD_CUDA12_NVCC_DIR does not name it. On a GPU it shows whether clang's kernels pass too.
#
#   bash tools/cuda_harness.sh                  # build and run everything the machine allows
#   bash tools/cuda_harness.sh --compile-only   # build only (no GPU needed)
#   bash tools/cuda_harness.sh --self-test      # build, run only the checks that need no GPU (CI)
#   bash tools/cuda_harness.sh --run-only       # run binaries built before (e.g. on a GPU machine
#                                               # without nvcc)
#   bash tools/cuda_harness.sh --static-only    # with any of the above: the static variant only
#   bash tools/cuda_harness.sh --clang          # with any of the above: also the clang variant
#   bash tools/cuda_harness.sh -- --quick       # arguments after -- go to the harness
#
# Architectures: TF_KLD_CUDA_ARCHS (tools/build_flags.py syntax) if set; else, with a GPU present,
# the library's defaults (sm_75/80/86/89/90 + compute_90 PTX), without one sm_80 only (compile
# time). CUDA_HOME or tools/build_flags.py finds nvcc.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

mode=all
variants=(static cudart12)
harness_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --static-only) variants=(static) ;;
    --clang) variants+=(clang) ;;
    --compile-only) mode=compile ;;
    --self-test) mode=self-test ;;
    --run-only) mode=run ;;
    --) shift; harness_args=("$@"); break ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "cuda_harness.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

out_dir=build/cuda_harness
CUDART12_WHEEL=nvidia-cuda-runtime-cu12==12.5.82  # TensorFlow 2.21's CUDA 12.5.1 runtime
have_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then have_gpu=1; fi

binary_of() { [[ $1 == static ]] && echo "$out_dir/harness" || echo "$out_dir/harness_$1"; }

# The directory holding libcudart.so.12: TensorFlow's (nvidia-cuda-runtime-cu12), else the pinned
# wheel pip-installed into $out_dir/cudart12 (once).
cudart12_dir() {
  if [[ -n ${TF_KLD_CUDART12_DIR:-} ]]; then echo "$TF_KLD_CUDART12_DIR"; return; fi
  local found
  found=$("$PYTHON" - <<'PY' 2>/dev/null || true
import glob, os, site, sys
for root in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    for lib in glob.glob(os.path.join(root, "nvidia", "cuda_runtime", "lib", "libcudart.so.12")):
        print(os.path.dirname(lib)); raise SystemExit
PY
)
  if [[ -n $found ]]; then echo "$found"; return; fi
  local target=$out_dir/cudart12
  if [[ ! -f $target/nvidia/cuda_runtime/lib/libcudart.so.12 ]]; then
    echo "cuda_harness.sh: pip install --target $target $CUDART12_WHEEL" >&2
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --target "$target" "$CUDART12_WHEEL" >&2
  fi
  echo "$(cd "$target/nvidia/cuda_runtime/lib" && pwd)"
}

# ptxas 12.5 and libdevice for the clang variant: TF_KLD_CUDA12_NVCC_DIR, an importable
# nvidia-cuda-nvcc-cu12, or the pinned wheel pip-installed into $out_dir/cuda12_nvcc (once).
CUDA12_NVCC_WHEEL=$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags
print(*build_flags.CLANG_CUDA_WHEELS)')
cuda12_nvcc() {
  [[ -n ${TF_KLD_CUDA12_NVCC_DIR:-} ]] && return
  "$PYTHON" -c 'import nvidia.cuda_nvcc' 2>/dev/null && return
  local target=$out_dir/cuda12_nvcc
  if [[ ! -x $target/nvidia/cuda_nvcc/bin/ptxas ]]; then
    echo "cuda_harness.sh: pip install --target $target $CUDA12_NVCC_WHEEL" >&2
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --target "$target" "$CUDA12_NVCC_WHEEL" >&2
  fi
  export TF_KLD_CUDA12_NVCC_DIR=$PWD/$target
}

if [[ $mode != run ]]; then
  cuda_home=$("$PYTHON" tools/build_flags.py --cuda-home) || {
    echo "cuda_harness.sh: no nvcc found: set CUDA_HOME (see tools/build_flags.py NVCC_WHEELS)" >&2
    exit 1
  }
  archs=${TF_KLD_CUDA_ARCHS:-}
  if [[ -z $archs ]]; then
    if [[ $have_gpu == 1 ]]; then archs=$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools")
import build_flags; print(build_flags.DEFAULT_CUDA_ARCHS)'); else archs=80-real; fi
  fi
  mapfile -t gencode < <("$PYTHON" tools/build_flags.py --gencode --archs "$archs")
  mkdir -p "$out_dir"
  for variant in "${variants[@]}"; do
    link=()
    if [[ $variant == cudart12 ]]; then
      lib=$(cudart12_dir)
      link=(-cudart none -L"$lib" -l:libcudart.so.12 -Xlinker -rpath="$lib")
    fi
    start=$SECONDS
    if [[ $variant == clang ]]; then
      cuda12_nvcc
      lib=$(cudart12_dir)
      mapfile -t clang_cmd < <("$PYTHON" tools/build_flags.py --clang-command "$out_dir/clang_cuda" --archs "$archs")
      echo "cuda_harness.sh: ${clang_cmd[0]} for $archs (ptxas 12.5, cudart12 runtime)"
      "${clang_cmd[@]}" -I. bench/cuda/harness.cu -L"$lib" -l:libcudart.so.12 -Wl,-rpath,"$lib" \
        -o "$(binary_of "$variant")"
    else
      echo "cuda_harness.sh: $cuda_home/bin/nvcc for $archs ($variant runtime)"
      # -fmad=false as the op library (tools/build_flags.py NVCC_FLAGS).
      "$cuda_home/bin/nvcc" -std=c++17 -O3 -fmad=false --expt-relaxed-constexpr -I. "${gencode[@]}" \
        --threads "${#gencode[@]}" bench/cuda/harness.cu "${link[@]}" -o "$(binary_of "$variant")"
    fi
    echo "cuda_harness.sh: built $(binary_of "$variant") in $((SECONDS - start)) s"
  done
fi
[[ $mode == compile ]] && exit 0
for variant in "${variants[@]}"; do
  [[ -x $(binary_of "$variant") ]] || { echo "cuda_harness.sh: $(binary_of "$variant") not built" >&2; exit 1; }
done

if [[ $mode == self-test ]]; then
  for variant in "${variants[@]}"; do
    echo "cuda_harness.sh: $(binary_of "$variant") --self-test"
    "$(binary_of "$variant")" --self-test "${harness_args[@]}"
  done
  exit 0
fi
mkdir -p bench/out
name=()
if [[ $have_gpu == 1 ]]; then name=(--device-name "$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)"); fi
status=0
for variant in "${variants[@]}"; do
  results=bench/out/cuda_harness$([[ $variant == static ]] || echo "_$variant")
  echo "cuda_harness.sh: $(binary_of "$variant") ($variant runtime)"
  "$(binary_of "$variant")" --json "$results.json" --csv "$results.csv" "${name[@]}" "${harness_args[@]}" ||
    status=$?
done
[[ $status == 0 ]] || exit "$status"
if [[ $have_gpu == 1 ]] && "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  "$PYTHON" bench/cuda/torch_peers.py --harness bench/out/cuda_harness.json \
    --out bench/out/cuda_peers "${harness_args[@]}"
else
  echo "cuda_harness.sh: no PyTorch with CUDA here: torch.nn.functional.kl_div comparison skipped"
fi
