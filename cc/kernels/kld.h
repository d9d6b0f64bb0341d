// The functor contract of the KL-divergence kernels, templated on device and element type.
//
//   loss[r]  = sum_c tc * log(tc / pc),   tc = clip(y_true[r, c]), pc = clip(y_pred[r, c])
//   d/dy_pred = -g[r] * tc / pc           where eps <= y_pred <= 1, else 0
//   d/dy_true =  g[r] * (log(tc / pc) + 1) where eps <= y_true <= 1, else 0
//
// clip(x) = max(min(x, 1), eps) with NaN passing through, as tf.clip_by_value. Inputs are dense,
// row-major [rows, cols]; float16/bfloat16 compute in float32, float32 accumulates in double.
// No TensorFlow glue here beyond the Eigen device types, so CPU and CUDA can share it.
#ifndef TF_KLD_CC_KERNELS_KLD_H_
#define TF_KLD_CC_KERNELS_KLD_H_

#include <cstdint>

namespace tf_kld {

// Which input's gradient KlDivergenceGrad computes.
enum class Wrt { kYPred, kYTrue };

template <typename Device, typename T>
struct KlDivergenceFunctor {
  // loss: [rows]. rows > 0; cols may be 0 (the loss is then 0).
  void operator()(const Device& d, const T* y_true, const T* y_pred, T* loss, int64_t rows,
                  int64_t cols, double eps) const;
};

template <typename Device, typename T>
struct KlDivergenceGradFunctor {
  // grad: [rows], the upstream gradient of loss; out: [rows, cols], may alias y_true or y_pred.
  void operator()(const Device& d, const T* grad, const T* y_true, const T* y_pred, T* out,
                  int64_t rows, int64_t cols, double eps, Wrt wrt) const;
};

}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_KLD_H_
