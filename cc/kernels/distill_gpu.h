// The CUDA side of the distillation ops as the OpKernels in distill_kernels.cc see it: launchers
// declared here, defined in distill_kernels.cu.cc (CUDA builds only: GOOGLE_CUDA=1), no CUDA
// headers needed. Include it before anything that includes Eigen (kld_gpu.h turns on Eigen's GPU
// device).
#ifndef TF_KLD_CC_KERNELS_DISTILL_GPU_H_
#define TF_KLD_CC_KERNELS_DISTILL_GPU_H_

#if GOOGLE_CUDA

#include <cstdint>

#include "cc/kernels/kld_gpu.h"

namespace tf_kld {
namespace distill_gpu {

// KL when jsd is false (beta unused), else the generalized JSD with 0 < beta < 1.
struct Params {
  double temperature = 1.0;
  bool jsd = false;
  double beta = 0.5;
};

// Each returns nullptr, or the failed launch's error string. Launched on d's stream.
template <typename T>
struct Launchers {
  // loss[rows] and stats[rows, 5 (KL) or 6 (JSD)] of [rows, cols] logits (cols may be 0).
  static const char* Forward(const GPUDevice& d, const Params& params, const T* y_true, const T* y_pred,
                             T* loss, double* stats, int64_t rows, int64_t cols);
  // d_true and/or d_pred (nullptr: not wanted) from the upstream gradient and the stats.
  static const char* Gradient(const GPUDevice& d, const Params& params, const T* grad, const T* y_true,
                              const T* y_pred, const double* stats, T* d_true, T* d_pred, int64_t rows,
                              int64_t cols);
};

extern template struct Launchers<Eigen::half>;
extern template struct Launchers<Eigen::bfloat16>;
extern template struct Launchers<float>;
extern template struct Launchers<double>;

}  // namespace distill_gpu
}  // namespace tf_kld

#endif  // GOOGLE_CUDA
#endif  // TF_KLD_CC_KERNELS_DISTILL_GPU_H_
