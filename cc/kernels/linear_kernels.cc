// CPU OpKernel of TfKld>AccumulateTransposedMatMul (tf_kld.linear_distillation_loss's in-place
// weight-gradient accumulation): acc + a^T b in acc's buffer, columns split across threads.
#define EIGEN_USE_THREADS

#include <cstring>
#include <type_traits>

#include "cc/kernels/distill_cpu.h"
#include "cc/kernels/kld_registration.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tf_kld {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

// float64 (the exact tests' type): plain loops, the same order of summation as the float core.
void RankUpdateDouble(const double* a, const double* b, double* acc, int64_t k, int64_t m, int64_t n,
                      int64_t col_begin, int64_t col_end) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = col_begin; c < col_end; ++c) {
      double s = acc[i * n + c];
      for (int64_t j = 0; j < k; ++j) s += a[j * m + i] * b[j * n + c];
      acc[i * n + c] = s;
    }
  }
}

void RankUpdate(const float* a, const float* b, float* acc, int64_t k, int64_t m, int64_t n,
                int64_t col_begin, int64_t col_end) {
  distill::Cpu().rank_update(a, b, acc, k, m, n, col_begin, col_end);
}

template <typename T>
class AccumulateTransposedMatMulOp : public OpKernel {
 public:
  explicit AccumulateTransposedMatMulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& acc = ctx->input(0);
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    OP_REQUIRES(ctx, acc.dims() == 2 && a.dims() == 2 && b.dims() == 2 &&
                         a.dim_size(0) == b.dim_size(0) && acc.dim_size(0) == a.dim_size(1) &&
                         acc.dim_size(1) == b.dim_size(1),
                absl::InvalidArgumentError(absl::StrCat(
                    "acc [m, n], a [k, m] and b [k, n] must be matrices that match, got acc ",
                    acc.shape().DebugString(), ", a ", a.shape().DebugString(), ", b ",
                    b.shape().DebugString())));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, acc.shape(), &out));
    const int64_t k = a.dim_size(0), m = acc.dim_size(0), n = acc.dim_size(1);
    T* o = out->flat<T>().data();
    const T* in = acc.flat<T>().data();
    if (o != in && acc.NumElements() > 0) {  // acc has another reader: leave it as it is
      std::memcpy(o, in, acc.NumElements() * sizeof(T));
    }
    if (k == 0 || m == 0 || n == 0) return;
    const T* pa = a.flat<T>().data();
    const T* pb = b.flat<T>().data();
    // Whole panels per shard (the split never changes a column's arithmetic).
    const int64_t panels = (n + distill::kRankPanel - 1) / distill::kRankPanel;
    const double flops = 2.0 * k * m * distill::kRankPanel;
    ctx->eigen_device<CPUDevice>().parallelFor(
        panels,
        Eigen::TensorOpCost(sizeof(T) * (k + 2 * m) * distill::kRankPanel,
                            sizeof(T) * m * distill::kRankPanel, flops / 16.0),
        [&](Eigen::Index begin, Eigen::Index end) {
          const int64_t c0 = begin * distill::kRankPanel;
          const int64_t c1 = end * distill::kRankPanel < n ? end * distill::kRankPanel : n;
          if constexpr (std::is_same_v<T, float>) {
            RankUpdate(pa, pb, o, k, m, n, c0, c1);
          } else {
            RankUpdateDouble(pa, pb, o, k, m, n, c0, c1);
          }
        });
  }
};

}  // namespace

TF_KLD_REGISTER_KERNEL(Name("TfKld>AccumulateTransposedMatMul")
                           .Device(tensorflow::DEVICE_CPU)
                           .TypeConstraint<float>("T"),
                       AccumulateTransposedMatMulOp<float>);
TF_KLD_REGISTER_KERNEL(Name("TfKld>AccumulateTransposedMatMul")
                           .Device(tensorflow::DEVICE_CPU)
                           .TypeConstraint<double>("T"),
                       AccumulateTransposedMatMulOp<double>);

}  // namespace tf_kld
