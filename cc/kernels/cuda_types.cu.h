// TensorFlow's element types as the CUDA kernel cores see them, for the GPU launchers
// (kld_kernels.cu.cc, distill_kernels.cu.cc). Include after the TensorFlow/Eigen headers.
#ifndef TF_KLD_CC_KERNELS_CUDA_TYPES_CU_H_
#define TF_KLD_CC_KERNELS_CUDA_TYPES_CU_H_
#if GOOGLE_CUDA

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tf_kld {
namespace {  // each launcher object keeps its own copy, as before

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

}  // namespace
}  // namespace tf_kld

#endif  // GOOGLE_CUDA
#endif  // TF_KLD_CC_KERNELS_CUDA_TYPES_CU_H_
