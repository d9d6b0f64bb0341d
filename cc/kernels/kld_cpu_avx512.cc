// The kernel core built for AVX-512 (F, BW, VL, DQ) + FMA + F16C: 16 float lanes a register
// (this file alone gets the AVX-512 flags; see tools/build_flags.py).
// GCC 12's AVX-512 intrinsics start from a self-initialised "undefined" register, which
// -Wmaybe-uninitialized reports wherever they are inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define TF_KLD_ISA_NAME "avx512"
#define TF_KLD_ISA_NAMESPACE isa_avx512
#define TF_KLD_KERNELS_FN Avx512Kernels
#include "cc/kernels/kld_cpu_impl.h"
#include "cc/kernels/distill_cpu_impl.h"  // the distillation family's core, same ISA
