// The CPU kernel core's interface: plain loops over contiguous memory, no TensorFlow.
//
// The same core (kld_cpu_impl.h) is compiled three times: for the baseline x86-64 ISA
// (kld_cpu_generic.cc), for AVX2+FMA+F16C (kld_cpu_avx2.cc) and for AVX-512 F/BW/VL/DQ
// (kld_cpu_avx512.cc). Each build exports one table; Cpu() picks the best the CPU supports, once.
#ifndef TF_KLD_CC_KERNELS_KLD_CPU_H_
#define TF_KLD_CC_KERNELS_KLD_CPU_H_

#include <cstdint>

namespace tf_kld {
namespace cpu {

enum class Type { kHalf, kBfloat16, kFloat, kDouble };

struct Kernels {
  const char* isa;
  // loss[r] for rows [row_begin, row_end) of [*, cols] inputs; out points at loss[0].
  void (*forward_rows)(Type type, const void* y_true, const void* y_pred, void* out,
                       int64_t row_begin, int64_t row_end, int64_t cols, double eps);
  // Sum of the terms of n contiguous elements, in double: one chunk of a very wide row.
  double (*sum_terms)(Type type, const void* y_true, const void* y_pred, int64_t n, double eps);
  // Gradient for flat elements [begin, end) of [*, cols] inputs; grad has one value per row.
  void (*gradient)(Type type, const void* grad, const void* y_true, const void* y_pred, void* out,
                   int64_t begin, int64_t end, int64_t cols, double eps, bool wrt_true);
};

// Hidden: the library's own, never bound to another loaded copy of it (nor exported from it).
#define TF_KLD_CPU_HIDDEN __attribute__((visibility("hidden")))

TF_KLD_CPU_HIDDEN const Kernels& GenericKernels();
TF_KLD_CPU_HIDDEN const Kernels& Avx2Kernels();  // only call when the CPU has AVX2, FMA and F16C
TF_KLD_CPU_HIDDEN const Kernels& Avx512Kernels();  // ... and AVX-512 F, BW, VL and DQ

// The kernels for this CPU: the widest build it runs, capped by TF_KLD_CPU_ISA=avx2|generic.
TF_KLD_CPU_HIDDEN const Kernels& Cpu();

}  // namespace cpu
}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_KLD_CPU_H_
