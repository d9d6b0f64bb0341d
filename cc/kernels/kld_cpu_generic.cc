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
const Kernels& Choose() {
  const char* forced = std::getenv("TF_KLD_CPU_ISA");  // "generic" forces the baseline build
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return GenericKernels();
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Avx2Kernels();
  }
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
  static const Kernels& kernels =
      std::strcmp(cpu::Cpu().isa, "avx2") == 0 ? Avx2Kernels() : GenericKernels();
  return kernels;
}

}  // namespace distill
}  // namespace tf_kld

// The kernel build in use ("avx2" or "generic"), for tf_kld's diagnostics (read with ctypes).
extern "C" __attribute__((visibility("default"))) const char* TfKldCpuIsa() {
  return tf_kld::cpu::Cpu().isa;
}
