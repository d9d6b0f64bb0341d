// The functor contract of the KL-divergence kernels, templated on device and element type.
//
//   loss[r]  = sum_c tc * log(tc / pc),   tc = clip(y_true[r, c]), pc = clip(y_pred[r, c])
//   d/dy_pred = -g[r] * tc / pc           where eps <= y_pred <= 1, else 0
//   d/dy_true =  g[r] * (log(tc / pc) + 1) where eps <= y_true <= 1, else 0
//   (for eps <= 0, autodiff's form of the same: see UseFusedGradient)
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

// Whether the gradient formulas above are used: for eps > 0. There they equal, NaN for NaN, what
// TensorFlow's autodiff of the composite computes, g * log(r) + g * tc * (1 / r) / pc and
// g * tc * (1 / r) * (-tc / pc / pc) with r = tc / pc, as tc, pc and r are nonzero (for eps below
// 2^-64 in float, 2^-511 in double, autodiff overflows to inf or NaN where these formulas keep the
// right finite value; kept on purpose). For eps <= 0 (also a 16-bit epsilon that rounds to 0) a
// zero tc or pc makes autodiff's 0 * inf a NaN where these formulas give numbers, so kernels then
// evaluate autodiff's expressions themselves. `static`: no symbol shared between objects.
static inline bool UseFusedGradient(double eps) { return eps > 0; }

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
