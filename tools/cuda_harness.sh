#!/usr/bin/env bash
# Builds the standalone CUDA harness (bench/cuda/harness.cu: the kernel core, no TensorFlow) with nvcc
# and runs it: the CPU-side self-test, the GPU checks against a float64 reference, and the benchmark
# (GB/s against a device-to-device copy), written to bench/results/cuda_harness.{json,csv}. If
# PyTorch with CUDA is importable, bench/cuda/torch_peers.py then times torch.nn.functional.kl_div
# (eager and torch.compile) on the same GPU and shapes and writes bench/results/cuda_peers.{json,md}.
#
#   bash tools/cuda_harness.sh                  # build and run everything the machine allows
#   bash tools/cuda_harness.sh --compile-only   # build only (no GPU needed)
#   bash tools/cuda_harness.sh --self-test      # build, run only the checks that need no GPU (CI)
#   bash tools/cuda_harness.sh --run-only       # run a binary built before (e.g. on a GPU machine
#                                               # without nvcc; it links the CUDA runtime statically)
#   bash tools/cuda_harness.sh -- --quick       # arguments after -- go to the harness
#
# Architectures: TF_KLD_CUDA_ARCHS (tools/build_flags.py syntax) if set; else, with a GPU present,
# the library's defaults (sm_75/80/86/89/90 + compute_90 PTX), without one sm_80 only (compile
# time). The binary is build/cuda_harness/harness; CUDA_HOME or tools/build_flags.py finds nvcc.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

mode=all
harness_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --compile-only) mode=compile ;;
    --self-test) mode=self-test ;;
    --run-only) mode=run ;;
    --) shift; harness_args=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "cuda_harness.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

out_dir=build/cuda_harness
binary=$out_dir/harness
have_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then have_gpu=1; fi

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
  start=$SECONDS
  echo "cuda_harness.sh: $cuda_home/bin/nvcc for $archs"
  "$cuda_home/bin/nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -I. "${gencode[@]}" \
    --threads "${#gencode[@]}" bench/cuda/harness.cu -o "$binary"
  echo "cuda_harness.sh: built $binary in $((SECONDS - start)) s"
fi
[[ $mode == compile ]] && exit 0
[[ -x $binary ]] || { echo "cuda_harness.sh: $binary not built" >&2; exit 1; }

if [[ $mode == self-test ]]; then
  exec "$binary" --self-test "${harness_args[@]}"
fi
mkdir -p bench/results
"$binary" --json bench/results/cuda_harness.json --csv bench/results/cuda_harness.csv "${harness_args[@]}"
if [[ $have_gpu == 1 ]] && "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  "$PYTHON" bench/cuda/torch_peers.py --harness bench/results/cuda_harness.json \
    --out bench/results/cuda_peers "${harness_args[@]}"
else
  echo "cuda_harness.sh: no PyTorch with CUDA here: torch.nn.functional.kl_div comparison skipped"
fi
