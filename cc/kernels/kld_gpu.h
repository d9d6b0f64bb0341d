// The CUDA specialisation of the functors, declared for the GPU kernel registrations in
// kld_kernels.cc and defined in kld_kernels.cu.cc (CUDA builds only: GOOGLE_CUDA=1). Include it
// before anything that includes Eigen: it turns on Eigen's GPU device.
//
// Only stream() of Eigen::GpuDevice is used (scratch comes from the OpKernel's allocate_temp): its
// allocate() makes TensorFlow fail the op itself when memory runs out and its deallocate() blocks the
// stream on a host callback; its device properties are TensorFlow's cudaDeviceProp, laid out by
// CUDA 12.5, which differs from CUDA 13's (multiProcessorCount is at another offset).
#ifndef TF_KLD_CC_KERNELS_KLD_GPU_H_
#define TF_KLD_CC_KERNELS_KLD_GPU_H_

#if GOOGLE_CUDA

#ifndef EIGEN_USE_GPU
#define EIGEN_USE_GPU
#endif

#include <cstdint>

#include "cc/kernels/kld.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tf_kld {

using GPUDevice = Eigen::GpuDevice;

template <typename T>
struct KlDivergenceFunctor<GPUDevice, T> {
  // Device memory a forward of this shape needs (0 for most shapes: only few wide rows are split).
  // The OpKernel allocates it with allocate_temp and sets `scratch` before calling.
  static int64_t ScratchBytes(int64_t rows, int64_t cols);
  double* scratch = nullptr;

  void operator()(const GPUDevice& d, const T* y_true, const T* y_pred, T* loss, int64_t rows, int64_t cols,
                  double eps) const;
};

template <typename T>
struct KlDivergenceGradFunctor<GPUDevice, T> {
  void operator()(const GPUDevice& d, const T* grad, const T* y_true, const T* y_pred, T* out, int64_t rows,
                  int64_t cols, double eps, Wrt wrt) const;
};

#define TF_KLD_DECLARE_GPU(T)                               \
  extern template struct KlDivergenceFunctor<GPUDevice, T>; \
  extern template struct KlDivergenceGradFunctor<GPUDevice, T>;
TF_KLD_DECLARE_GPU(Eigen::half)
TF_KLD_DECLARE_GPU(Eigen::bfloat16)
TF_KLD_DECLARE_GPU(float)
TF_KLD_DECLARE_GPU(double)
#undef TF_KLD_DECLARE_GPU

namespace gpu {

// The functor contract returns nothing, so the GPU functors record a failed launch (e.g. no kernel
// image for this GPU's architecture) for the calling thread; the OpKernel takes it right after.
// nullptr when the last launches succeeded. Reading clears it.
const char* TakeLaunchError();

// The cudaDriverGetVersion the device code needs: the nvcc version that compiled it (13000 for 13.0).
int NeededDriverVersion();

}  // namespace gpu
}  // namespace tf_kld

// The virtual CUDA architectures the library was compiled for, e.g. "750,800,860,890,900".
extern "C" const char* TfKldCudaArchs();

#endif  // GOOGLE_CUDA
#endif  // TF_KLD_CC_KERNELS_KLD_GPU_H_
