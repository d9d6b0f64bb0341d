// CUDA specialisation of the KL-divergence functors: TensorFlow's types mapped onto the kernel core
// (kld_gpu.cu.h), launched on the op's stream. Compiled by nvcc in CUDA builds only.
#if GOOGLE_CUDA

#include "cc/kernels/kld_gpu.cu.h"
#include "cc/kernels/kld_gpu.h"  // first: turns on Eigen's GPU device

#define TF_KLD_STRINGIFY2(...) #__VA_ARGS__
#define TF_KLD_STRINGIFY(...) TF_KLD_STRINGIFY2(__VA_ARGS__)

namespace tf_kld {
namespace {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<Eigen::half> {
  using type = __half;
};
template <>
struct CudaType<Eigen::bfloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(Eigen::half) == sizeof(__half) && sizeof(Eigen::bfloat16) == sizeof(__nv_bfloat16),
              "Eigen's 16-bit types must be bit-compatible with CUDA's");

template <typename T>
const typename CudaType<T>::type* Cuda(const T* p) {
  return reinterpret_cast<const typename CudaType<T>::type*>(p);
}
template <typename T>
typename CudaType<T>::type* Cuda(T* p) {
  return reinterpret_cast<typename CudaType<T>::type*>(p);
}

// 16-bit types keep the CPU core's accuracy (logf, IEEE division); the harness measures fast_math
// (__logf, __fdividef; see kld_gpu.cu.h) so this can be revisited with numbers from a GPU.
constexpr bool kFastMath = false;

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
}  // namespace gpu

template <typename T>
void KlDivergenceFunctor<GPUDevice, T>::operator()(const GPUDevice& d, const T* y_true, const T* y_pred,
                                                   T* loss, int64_t rows, int64_t cols, double eps) const {
  gpu::ForwardPlan plan = gpu::PlanForward(rows, cols, sizeof(T));
  double* scratch = nullptr;
  if (plan.splits > 1) {
    // From TensorFlow's allocator, ordered on this stream: freeing right after the launch is safe.
    scratch = static_cast<double*>(d.allocate(gpu::ForwardScratchBytes(plan, rows)));
    if (scratch == nullptr) plan = gpu::PlanForward(rows, cols, sizeof(T), /*allow_split=*/false);
  }
  Record(gpu::LaunchForward(d.stream(), Cuda(y_true), Cuda(y_pred), Cuda(loss), rows, cols, eps, plan,
                            scratch, kFastMath));
  if (scratch != nullptr) d.deallocate(scratch);
}

template <typename T>
void KlDivergenceGradFunctor<GPUDevice, T>::operator()(const GPUDevice& d, const T* grad, const T* y_true,
                                                       const T* y_pred, T* out, int64_t rows, int64_t cols,
                                                       double eps, Wrt wrt) const {
  Record(gpu::LaunchGradient(d.stream(), Cuda(grad), Cuda(y_true), Cuda(y_pred), Cuda(out), rows, cols, eps,
                             wrt == Wrt::kYTrue, kFastMath));
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

// The virtual architectures compiled in, e.g. "750,800,860,890,900" (ctypes; CI checks it).
extern "C" __attribute__((visibility("default"))) const char* TfKldCudaArchs() {
  return TF_KLD_STRINGIFY(__CUDA_ARCH_LIST__);
}

#endif  // GOOGLE_CUDA
