// The CPU core's element type (cpu::Type) of each TensorFlow type the OpKernels register, shared by
// the KL, distillation and linear kernels.
#ifndef TF_KLD_CC_KERNELS_CPU_TYPE_OF_H_
#define TF_KLD_CC_KERNELS_CPU_TYPE_OF_H_

#include "cc/kernels/kld_cpu.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tf_kld {

template <typename T> struct CpuType;
template <> struct CpuType<Eigen::half> { static constexpr cpu::Type value = cpu::Type::kHalf; };
template <> struct CpuType<Eigen::bfloat16> { static constexpr cpu::Type value = cpu::Type::kBfloat16; };
template <> struct CpuType<float> { static constexpr cpu::Type value = cpu::Type::kFloat; };
template <> struct CpuType<double> { static constexpr cpu::Type value = cpu::Type::kDouble; };

}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_CPU_TYPE_OF_H_
