// CUDA specialisation of the KL-divergence functors: TensorFlow's types mapped onto the kernel core
// (kld_gpu.cu.h), launched on the op's stream. Compiled by nvcc in CUDA builds only.
#if GOOGLE_CUDA

#include "cc/kernels/kld_gpu.cu.h"
#include "cc/kernels/kld_gpu.h"  // first: turns on Eigen's GPU device
#include "cc/kernels/cuda_types.cu.h"  // CudaType, Cuda()

#define TF_KLD_STRINGIFY2(...) #__VA_ARGS__
#define TF_KLD_STRINGIFY(...) TF_KLD_STRINGIFY2(__VA_ARGS__)

namespace tf_kld {
namespace {

// 16-bit types keep the CPU core's accuracy (logf, IEEE division): the launchers' kFastMath stays
// false, so the fast_math kernels the harness measures (kld_gpu.cu.h) are not compiled in here.

thread_local const char* launch_error = nullptr;

void Record(cudaError_t err) {
  if (err != cudaSuccess && launch_error == nullptr) launch_error = cudaGetErrorString(err);
}

}  // namespace

namespace gpu {
const char* TakeLaunchError() {
  const char* err = launch_error;
  launch_error = nullptr;
  return err;
}

// nvcc's device code needs a driver of nvcc's own version; a clang build (PTX assembled by ptxas
// 12.x) says what it needs with TF_KLD_NEEDED_DRIVER (tools/build_flags.py).
#ifdef TF_KLD_NEEDED_DRIVER
int NeededDriverVersion() { return TF_KLD_NEEDED_DRIVER; }
#else
int NeededDriverVersion() { return __CUDACC_VER_MAJOR__ * 1000 + __CUDACC_VER_MINOR__ * 10; }
#endif
}  // namespace gpu

template <typename T>
int64_t KlDivergenceFunctor<GPUDevice, T>::ScratchBytes(int64_t rows, int64_t cols) {
  return static_cast<int64_t>(gpu::ForwardScratchBytes(gpu::PlanForward(rows, cols, sizeof(T)), rows));
}

template <typename T>
void KlDivergenceFunctor<GPUDevice, T>::operator()(const GPUDevice& d, const T* y_true, const T* y_pred,
                                                   T* loss, int64_t rows, int64_t cols, double eps) const {
  // Split or not depends on the shape only (results are deterministic), so without scratch the
  // launcher fails with cudaErrorInvalidValue rather than summing in another order.
  const gpu::ForwardPlan plan = gpu::PlanForward(rows, cols, sizeof(T));
  Record(
      gpu::LaunchForward(d.stream(), Cuda(y_true), Cuda(y_pred), Cuda(loss), rows, cols, eps, plan, scratch));
}

template <typename T>
void KlDivergenceGradFunctor<GPUDevice, T>::operator()(const GPUDevice& d, const T* grad, const T* y_true,
                                                       const T* y_pred, T* out, int64_t rows, int64_t cols,
                                                       double eps, Wrt wrt) const {
  Record(gpu::LaunchGradient(d.stream(), Cuda(grad), Cuda(y_true), Cuda(y_pred), Cuda(out), rows, cols, eps,
                             wrt == Wrt::kYTrue));
}

template struct KlDivergenceFunctor<GPUDevice, Eigen::half>;
template struct KlDivergenceFunctor<GPUDevice, Eigen::bfloat16>;
template struct KlDivergenceFunctor<GPUDevice, float>;
template struct KlDivergenceFunctor<GPUDevice, double>;
template struct KlDivergenceGradFunctor<GPUDevice, Eigen::half>;
template struct KlDivergenceGradFunctor<GPUDevice, Eigen::bfloat16>;
template struct KlDivergenceGradFunctor<GPUDevice, float>;
template struct KlDivergenceGradFunctor<GPUDevice, double>;

}  // namespace tf_kld

// The virtual architectures compiled in, e.g. "750,800,860,890,900" (ctypes; CI checks it). nvcc
// names them; a clang build passes TF_KLD_CUDA_ARCH_LIST.
#ifndef TF_KLD_CUDA_ARCH_LIST
#define TF_KLD_CUDA_ARCH_LIST __CUDA_ARCH_LIST__
#endif
extern "C" __attribute__((visibility("default"))) const char* TfKldCudaArchs() {
  return TF_KLD_STRINGIFY(TF_KLD_CUDA_ARCH_LIST);
}

#endif  // GOOGLE_CUDA
