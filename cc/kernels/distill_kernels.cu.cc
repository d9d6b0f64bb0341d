// CUDA specialisation of the distillation ops' launchers: TensorFlow's types mapped onto the kernel
// core (distill_gpu.cu.h), launched on the op's stream. Compiled by nvcc in CUDA builds only.
#if GOOGLE_CUDA

#include "cc/kernels/distill_gpu.cu.h"
#include "cc/kernels/distill_gpu.h"  // first of the TensorFlow side: turns on Eigen's GPU device
#include "cc/kernels/cuda_types.cu.h"  // CudaType, Cuda()

namespace tf_kld {
namespace distill_gpu {
namespace {

gpu::distill::Params Core(const Params& params) {
  return params.jsd ? gpu::distill::JsdParams(params.temperature, params.beta)
                    : gpu::distill::KlParams(params.temperature);
}

const char* Error(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

template <typename T>
const char* Launchers<T>::Forward(const GPUDevice& d, const Params& params, const T* y_true, const T* y_pred,
                                  T* loss, double* stats, int64_t rows, int64_t cols) {
  return Error(gpu::distill::LaunchForward(d.stream(), Core(params), Cuda(y_true), Cuda(y_pred), Cuda(loss),
                                           stats, rows, cols));
}

template <typename T>
const char* Launchers<T>::Gradient(const GPUDevice& d, const Params& params, const T* grad, const T* y_true,
                                   const T* y_pred, const double* stats, T* d_true, T* d_pred, int64_t rows,
                                   int64_t cols) {
  return Error(gpu::distill::LaunchGradient(d.stream(), Core(params), Cuda(grad), Cuda(y_true), Cuda(y_pred),
                                            stats, Cuda(d_true), Cuda(d_pred), rows, cols));
}

template struct Launchers<Eigen::half>;
template struct Launchers<Eigen::bfloat16>;
template struct Launchers<float>;
template struct Launchers<double>;

}  // namespace distill_gpu
}  // namespace tf_kld

#endif  // GOOGLE_CUDA
