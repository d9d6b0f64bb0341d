#!/usr/bin/env bash
# Builds bench/cpu_core_bench.cc (the CPU kernel core alone, no TensorFlow) with the library's own
# flags and runs it; extra args go to the binary (--quick: small shapes only).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
bash tools/build_core.sh "$out/cpu_core_bench" bench/cpu_core_bench.cc
"$out/cpu_core_bench" "$@"
