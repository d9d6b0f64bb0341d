#!/usr/bin/env bash
# Builds the CPU kernel core (no TensorFlow) with cc/tests/kld_cpu_test.cc under AddressSanitizer and
# UndefinedBehaviorSanitizer and runs it. Exit status non-zero on a build failure, a failed check or
# any sanitizer report. CXX overrides g++; the object files go to a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a cxx <<<"${CXX:-g++}"
PYTHON=${PYTHON:-python3}

# The library's own flags (tools/build_flags.py; no TensorFlow import needed), at -O1 for the sanitizers.
read -r -a own_flags <<<"$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags as b
print(" ".join(f for f in b.CXXFLAGS if f not in ("-O3", "-fPIC")))')"
read -r -a avx2_flags <<<"$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags as b
print(" ".join(b.AVX2_FLAGS))')"
san=(-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer)
flags=(-std=c++17 -O1 -g -I. "${own_flags[@]}" "${san[@]}")

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"${cxx[@]}" "${flags[@]}" -c cc/kernels/kld_cpu_generic.cc -o "$out/generic.o" &
"${cxx[@]}" "${flags[@]}" "${avx2_flags[@]}" -c cc/kernels/kld_cpu_avx2.cc -o "$out/avx2.o" &
"${cxx[@]}" "${flags[@]}" -c cc/tests/kld_cpu_test.cc -o "$out/test.o" &
for job in $(jobs -p); do wait "$job"; done
"${cxx[@]}" "${san[@]}" "$out/generic.o" "$out/avx2.o" "$out/test.o" -o "$out/kld_cpu_test"

export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:abort_on_error=0:exitcode=86}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:exitcode=87}
"$out/kld_cpu_test"
echo "tf_kld: sanitizers (address, undefined, float-cast-overflow) clean"
