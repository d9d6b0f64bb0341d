#!/usr/bin/env bash
# Builds a program on the CPU kernel core alone (no TensorFlow): the core's two ISA builds and MAIN,
# with the library's own flags (tools/build_flags.py, no TensorFlow import needed) followed by EXTRA
# flags, which also go to the link. tools/sanitize.sh and tools/cpu_core_bench.sh use it.
#
#   bash tools/build_core.sh OUTPUT MAIN.cc [EXTRA_FLAGS...]     (CXX overrides g++)
#
# TF_KLD_CORE_OBJDIR=DIR keeps the objects (generic.o, avx2.o, avx512.o, main.o) in DIR, e.g. for
# tests/test_isa_objects.py, which inspects them and links them in another order.
set -euo pipefail
output=$1 main=$2
shift 2
cd "$(dirname "$0")/.."
read -r -a cxx <<<"${CXX:-g++}"
PYTHON=${PYTHON:-python3}
read -r -a own_flags <<<"$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags as b
print(" ".join(f for f in b.CXXFLAGS if f != "-fPIC"))')"
read -r -a avx2_flags <<<"$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags as b
print(" ".join(b.AVX2_FLAGS))')"
read -r -a avx512_flags <<<"$("$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import build_flags as b
print(" ".join(b.AVX512_FLAGS))')"
flags=(-std=c++17 -I. "${own_flags[@]}" "$@")  # later flags win: EXTRA may set -O1

if [[ -n "${TF_KLD_CORE_OBJDIR:-}" ]]; then
  obj=$TF_KLD_CORE_OBJDIR
  mkdir -p "$obj"
else
  obj=$(mktemp -d)
  trap 'rm -rf "$obj"' EXIT
fi
"${cxx[@]}" "${flags[@]}" -c cc/kernels/kld_cpu_generic.cc -o "$obj/generic.o" &
"${cxx[@]}" "${flags[@]}" "${avx2_flags[@]}" -c cc/kernels/kld_cpu_avx2.cc -o "$obj/avx2.o" &
"${cxx[@]}" "${flags[@]}" "${avx512_flags[@]}" -c cc/kernels/kld_cpu_avx512.cc -o "$obj/avx512.o" &
"${cxx[@]}" "${flags[@]}" -c "$main" -o "$obj/main.o" &
for job in $(jobs -p); do wait "$job"; done
"${cxx[@]}" "$@" "$obj/generic.o" "$obj/avx2.o" "$obj/avx512.o" "$obj/main.o" -o "$output" -lpthread
