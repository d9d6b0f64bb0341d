#!/usr/bin/env bash
# Builds bench/cpu_core_bench.cc (the CPU kernel core alone, no TensorFlow) with the library's own
# flags (tools/build_flags.py) and runs it; extra args go to the binary (--quick: small shapes only).
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a cxx <<<"${CXX:-g++}"
PYTHON=${PYTHON:-python3}
read -r -a own_flags <<<"$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags as b
print(" ".join(f for f in b.CXXFLAGS if f != "-fPIC"))')"
read -r -a avx2_flags <<<"$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags as b
print(" ".join(b.AVX2_FLAGS))')"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags=(-std=c++17 -I. "${own_flags[@]}")
"${cxx[@]}" "${flags[@]}" -c cc/kernels/kld_cpu_generic.cc -o "$out/generic.o"
"${cxx[@]}" "${flags[@]}" "${avx2_flags[@]}" -c cc/kernels/kld_cpu_avx2.cc -o "$out/avx2.o"
"${cxx[@]}" "${flags[@]}" bench/cpu_core_bench.cc "$out/generic.o" "$out/avx2.o" -o "$out/cpu_core_bench" -lpthread
"$out/cpu_core_bench" "$@"
