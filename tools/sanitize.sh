#!/usr/bin/env bash
# Builds the CPU kernel core (no TensorFlow) with cc/tests/kld_cpu_test.cc under AddressSanitizer and
# UndefinedBehaviorSanitizer and runs it. Exit status non-zero on a build failure, a failed check or
# any sanitizer report. CXX overrides g++; the object files go to a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
san=(-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The library's own flags, then -O1 for the sanitizers.
bash tools/build_core.sh "$out/kld_cpu_test" cc/tests/kld_cpu_test.cc -O1 -g "${san[@]}"

export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:abort_on_error=0:exitcode=86}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1:exitcode=87}
"$out/kld_cpu_test"
echo "tf_kld: sanitizers (address, undefined, float-cast-overflow) clean"
