// The kernel core built for AVX2 + FMA + F16C (this file alone gets -mavx2 -mfma -mf16c).
#define TF_KLD_ISA_NAME "avx2"
#define TF_KLD_ISA_NAMESPACE isa_avx2
#define TF_KLD_KERNELS_FN Avx2Kernels
#include "cc/kernels/kld_cpu_impl.h"
#include "cc/kernels/distill_cpu_impl.h"  // the distillation family's core, same ISA
