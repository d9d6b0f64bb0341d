// The kernel core built for the baseline x86-64 ISA, and the run-time choice between builds.
#define TF_KLD_ISA_NAME "generic"
#define TF_KLD_ISA_NAMESPACE isa_generic
#define TF_KLD_KERNELS_FN GenericKernels
#include "cc/kernels/kld_cpu_impl.h"
#include "cc/kernels/distill_cpu_impl.h"  // the distillation family's core, same ISA

#include <cstdlib>
#include <cstring>

namespace tf_kld {
namespace cpu {

namespace {
bool HasAvx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool HasAvx512() {  // libgcc's checks include the OS saving the AVX-512 registers (XCR0)
  return HasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// The best build this CPU runs; TF_KLD_CPU_ISA=generic|avx2 caps it (for comparisons and tests).
const Kernels& Choose() {
  const char* cap = std::getenv("TF_KLD_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "generic") == 0) return GenericKernels();
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2_cap = cap != nullptr && std::strcmp(cap, "avx2") == 0;
  if (!avx2_cap && HasAvx512()) return Avx512Kernels();
  if (HasAvx2()) return Avx2Kernels();
#endif
  return GenericKernels();
}
}  // namespace

const Kernels& Cpu() {
  static const Kernels& kernels = Choose();
  return kernels;
}

}  // namespace cpu

namespace distill {

const Kernels& Cpu() {
  const char* isa = cpu::Cpu().isa;
  static const Kernels& kernels = std::strcmp(isa, "avx512") == 0 ? Avx512Kernels()
                                  : std::strcmp(isa, "avx2") == 0 ? Avx2Kernels()
                                                                  : GenericKernels();
  return kernels;
}

}  // namespace distill
}  // namespace tf_kld

// The kernel build in use ("avx512", "avx2" or "generic"), for tf_kld's diagnostics (read with ctypes).
extern "C" __attribute__((visibility("default"))) const char* TfKldCpuIsa() {
  return tf_kld::cpu::Cpu().isa;
}

// 1 where the linear loss's bfloat16 kernel gradient runs on AVX512_BF16 dot products, else 0.
extern "C" __attribute__((visibility("default"))) int TfKldCpuBf16Dot() {
  return tf_kld::distill::Cpu().linear_grads_bf16 != nullptr ? 1 : 0;
}
