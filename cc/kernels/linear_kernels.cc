// CPU OpKernels of tf_kld.linear_distillation_loss's per-chunk helpers: TfKld>LinearLogits
// (h @ w + bias in float32, 16-bit w widened in cache) and TfKld>AccumulateLinearGrads (acc + a^T b
// in acc's buffer and b w^T), each in one pass over fixed groups of columns.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cc/kernels/cpu_type_of.h"
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
using tensorflow::TensorShape;


// Output 0 as input 0 (acc) to be added to: acc's own buffer wherever TensorFlow allows it (acc has
// no other reader), else a copy of acc, so the op is pure either way.
template <typename T>
absl::Status AccumulatorOutput(OpKernelContext* ctx, Tensor** out) {
  const Tensor& acc = ctx->input(0);
  TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({0}, 0, acc.shape(), out));
  T* o = (*out)->flat<T>().data();
  const T* in = acc.flat<T>().data();
  if (o != in && acc.NumElements() > 0) std::memcpy(o, in, acc.NumElements() * sizeof(T));
  return absl::OkStatus();
}

// float64 (the exact tests' type): plain loops, the float core's order of summation; w nullptr:
// no d_a.
void LinearGradsDouble(const double* a, const double* b, double* acc, const double* w, double* d_a,
                       int64_t k, int64_t m, int64_t n, int64_t col_begin, int64_t col_end) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = col_begin; c < col_end; ++c) {
      double s = acc[i * n + c];
      for (int64_t j = 0; j < k; ++j) s += a[j * m + i] * b[j * n + c];
      acc[i * n + c] = s;
    }
  }
  if (w == nullptr) return;
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      double s = 0.0;
      for (int64_t c = col_begin; c < col_end; ++c) s += b[j * n + c] * w[i * n + c];
      d_a[j * m + i] += s;
    }
  }
}

// Columns go in groups of whole panels, at most kMaxGroups (fixed by n alone); each group sums its
// own d_a, and the groups' sums are added in order.
constexpr int64_t kMaxGroups = 64;
constexpr int64_t kMinPanelsPerGroup = 8;

// The column groups of an [.., n] pass: whole panels, at most kMaxGroups (fixed by n alone).
struct ColumnGroups {
  explicit ColumnGroups(int64_t n) {
    const int64_t panels = (n + distill::kRankPanel - 1) / distill::kRankPanel;
    count = std::min(kMaxGroups, (panels + kMinPanelsPerGroup - 1) / kMinPanelsPerGroup);
    const int64_t per_group = count > 0 ? (panels + count - 1) / count : 0;
    count = per_group > 0 ? (panels + per_group - 1) / per_group : 0;
    cols = per_group * distill::kRankPanel;
  }
  int64_t count = 0, cols = 0;
};

// float64: plain loops, j in order as the float kernel's.
void LinearLogitsDouble(const double* h, const double* w, const double* bias, double* out,
                        int64_t m, int64_t k, int64_t n, int64_t col_begin, int64_t col_end) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = col_begin; c < col_end; ++c) {
      double s = bias != nullptr ? bias[c] : 0.0;
      for (int64_t j = 0; j < k; ++j) s += h[i * k + j] * w[j * n + c];
      out[i * n + c] = s;
    }
  }
}

template <typename T, typename Tw>
class LinearLogitsOp : public OpKernel {
 public:
  explicit LinearLogitsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& h = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& bias = ctx->input(2);
    OP_REQUIRES(ctx, h.dims() == 2 && w.dims() == 2 && bias.dims() == 1 &&
                         h.dim_size(1) == w.dim_size(0) &&
                         (bias.dim_size(0) == w.dim_size(1) || bias.dim_size(0) == 0),
                absl::InvalidArgumentError(absl::StrCat(
                    "h [m, k], w [k, n] and bias [n] (or [0]: no bias) must match, got h ",
                    h.shape().DebugString(), ", w ", w.shape().DebugString(), ", bias ",
                    bias.shape().DebugString())));
    const int64_t m = h.dim_size(0), k = h.dim_size(1), n = w.dim_size(1);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({m, n}), &out));
    if (m == 0 || n == 0) return;
    T* o = out->flat<T>().data();
    const T* pb = bias.dim_size(0) > 0 ? bias.flat<T>().data() : nullptr;
    const Tw* pw = w.flat<Tw>().data();
    const Tw* ph = h.flat<Tw>().data();
    // The float kernels take h transposed and widened: [k, m] float32 (small: a chunk of rows).
    Tensor h_t;
    const float* pa = nullptr;
    if constexpr (!std::is_same_v<T, double>) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({k, m}), &h_t));
      float* a = h_t.flat<float>().data();
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < k; ++j) a[j * m + i] = static_cast<float>(ph[i * k + j]);
      }
      pa = a;
    }
    const ColumnGroups groups(n);
    ctx->eigen_device<CPUDevice>().parallelFor(
        groups.count,
        Eigen::TensorOpCost(sizeof(Tw) * k * groups.cols, sizeof(T) * m * groups.cols,
                            2.0 * k * m * groups.cols / 16.0),
        [&](Eigen::Index begin, Eigen::Index end) {
          for (Eigen::Index g = begin; g < end; ++g) {
            const int64_t c0 = g * groups.cols, c1 = std::min(n, (g + 1) * groups.cols);
            if constexpr (std::is_same_v<T, double>) {
              LinearLogitsDouble(ph, pw, pb, o, m, k, n, c0, c1);
            } else {
              distill::Cpu().linear_logits(pa, CpuType<Tw>::value, pw, pb, o, k, m, n, c0, c1);
            }
          }
        });
  }
};

template <typename T, typename Tw>
class AccumulateLinearGradsOp : public OpKernel {
 public:
  explicit AccumulateLinearGradsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("with_d_a", &with_d_a_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& acc = ctx->input(0);
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    const Tensor& w = ctx->input(3);
    OP_REQUIRES(ctx, acc.dims() == 2 && a.dims() == 2 && b.dims() == 2 && w.shape() == acc.shape() &&
                         a.dim_size(0) == b.dim_size(0) && acc.dim_size(0) == a.dim_size(1) &&
                         acc.dim_size(1) == b.dim_size(1),
                absl::InvalidArgumentError(absl::StrCat(
                    "acc [m, n], a [k, m], b [k, n] and w [m, n] must be matrices that match, got "
                    "acc ", acc.shape().DebugString(), ", a ", a.shape().DebugString(), ", b ",
                    b.shape().DebugString(), ", w ", w.shape().DebugString())));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, AccumulatorOutput<T>(ctx, &out));
    const int64_t k = a.dim_size(0), m = acc.dim_size(0), n = acc.dim_size(1);
    Tensor* d_a = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({with_d_a_ ? k : 0, m}), &d_a));
    T* o = out->flat<T>().data();
    T* da = d_a->flat<T>().data();
    std::fill(da, da + d_a->NumElements(), T(0));
    if (k == 0 || m == 0 || n == 0) return;

    const ColumnGroups column_groups(n);
    const int64_t groups = column_groups.count;
    Tensor partials;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<T>::value,
                                           TensorShape({with_d_a_ ? groups : 0, k, m}), &partials));
    T* part = partials.flat<T>().data();
    std::fill(part, part + partials.NumElements(), T(0));
    const T* pa = a.flat<T>().data();
    const T* pb = b.flat<T>().data();
    const Tw* pw = with_d_a_ ? w.flat<Tw>().data() : nullptr;
    const int64_t group_cols = column_groups.cols;
    ctx->eigen_device<CPUDevice>().parallelFor(
        groups,
        Eigen::TensorOpCost(sizeof(T) * (k + 2 * m) * group_cols, sizeof(T) * m * group_cols,
                            4.0 * k * m * group_cols / 16.0),
        [&](Eigen::Index begin, Eigen::Index end) {
          for (Eigen::Index g = begin; g < end; ++g) {
            const int64_t c0 = g * group_cols, c1 = std::min(n, (g + 1) * group_cols);
            T* part_g = with_d_a_ ? part + g * k * m : nullptr;
            if constexpr (std::is_same_v<T, double>) {
              LinearGradsDouble(pa, pb, o, pw, part_g, k, m, n, c0, c1);
            } else {
              distill::Cpu().linear_grads(pa, distill::Type::kFloat, pb, o, CpuType<Tw>::value, pw,
                                          part_g, k, m, n, c0, c1);
            }
          }
        });
    if (!with_d_a_) return;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = 0; i < k * m; ++i) da[i] += part[g * k * m + i];
    }
  }

 private:
  bool with_d_a_ = true;
};

// acc += scale * a^T b for 16-bit a [k, m], b [k, n] and float32 acc [m, n]: by AVX512_BF16 dot
// products for bfloat16 where the core has them (a packed in pairs of rows), else linear_grads on
// a widened and scaled (small: a chunk of rows) and b widened a panel at a time.
template <typename T>
class AccumulateKernelGradOp : public OpKernel {
 public:
  explicit AccumulateKernelGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& acc = ctx->input(0);
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    const Tensor& scale_t = ctx->input(3);
    OP_REQUIRES(ctx, acc.dims() == 2 && a.dims() == 2 && b.dims() == 2 &&
                         a.dim_size(0) == b.dim_size(0) && acc.dim_size(0) == a.dim_size(1) &&
                         acc.dim_size(1) == b.dim_size(1),
                absl::InvalidArgumentError(absl::StrCat(
                    "acc [m, n], a [k, m] and b [k, n] must be matrices that match, got acc ",
                    acc.shape().DebugString(), ", a ", a.shape().DebugString(), ", b ",
                    b.shape().DebugString())));
    OP_REQUIRES(ctx, scale_t.dims() == 0,
                absl::InvalidArgumentError(absl::StrCat("scale must be a scalar, got ",
                                                        scale_t.shape().DebugString())));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, AccumulatorOutput<float>(ctx, &out));
    const int64_t k = a.dim_size(0), m = acc.dim_size(0), n = acc.dim_size(1);
    float* o = out->flat<float>().data();
    if (k == 0 || m == 0 || n == 0) return;
    const float scale = scale_t.scalar<float>()();
    const auto& kernels = distill::Cpu();
    const auto* pa = reinterpret_cast<const uint16_t*>(a.flat<T>().data());
    const void* pb = b.flat<T>().data();
    const bool dot = std::is_same_v<T, Eigen::bfloat16> && kernels.linear_grads_bf16 != nullptr;
    Tensor a_t;  // a in the kernel's layout: pairs of rows (dot products), else float32 times scale
    if (dot) {
      const int64_t pairs = (k + 1) / 2;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_UINT32, TensorShape({pairs, m}), &a_t));
      uint32_t* ap = a_t.flat<uint32_t>().data();
      for (int64_t q = 0; q < pairs; ++q) {
        for (int64_t i = 0; i < m; ++i) {
          const uint32_t hi = 2 * q + 1 < k ? pa[(2 * q + 1) * m + i] : 0;
          ap[q * m + i] = pa[2 * q * m + i] | hi << 16;
        }
      }
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({k, m}), &a_t));
      float* af = a_t.flat<float>().data();
      const T* av = a.flat<T>().data();
      for (int64_t e = 0; e < k * m; ++e) af[e] = static_cast<float>(av[e]) * scale;
    }
    const ColumnGroups groups(n);
    const int64_t group_cols = groups.cols;
    ctx->eigen_device<CPUDevice>().parallelFor(
        groups.count,
        Eigen::TensorOpCost(sizeof(T) * k * group_cols, 2 * sizeof(float) * m * group_cols,
                            2.0 * k * m * group_cols / (dot ? 32.0 : 16.0)),
        [&](Eigen::Index begin, Eigen::Index end) {
          for (Eigen::Index g = begin; g < end; ++g) {
            const int64_t c0 = g * group_cols, c1 = std::min(n, (g + 1) * group_cols);
            if (dot) {
              kernels.linear_grads_bf16(a_t.flat<uint32_t>().data(), static_cast<const uint16_t*>(pb),
                                        o, k, m, n, c0, c1, scale);
            } else {
              kernels.linear_grads(a_t.flat<float>().data(), CpuType<T>::value, pb, o,
                                   distill::Type::kFloat, nullptr, nullptr, k, m, n, c0, c1);
            }
          }
        });
  }
};

template <typename T>
class AddColumnsOp : public OpKernel {
 public:
  explicit AddColumnsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& acc = ctx->input(0);
    const Tensor& block = ctx->input(1);
    const Tensor& offset_t = ctx->input(2);
    OP_REQUIRES(ctx, acc.dims() == 2 && block.dims() == 2 && acc.dim_size(0) == block.dim_size(0),
                absl::InvalidArgumentError(absl::StrCat(
                    "acc [m, n] and block [m, nb] must be matrices with the same rows, got acc ",
                    acc.shape().DebugString(), ", block ", block.shape().DebugString())));
    OP_REQUIRES(ctx, offset_t.dims() == 0,
                absl::InvalidArgumentError(absl::StrCat("offset must be a scalar, got ",
                                                        offset_t.shape().DebugString())));
    const int64_t m = acc.dim_size(0), n = acc.dim_size(1), nb = block.dim_size(1);
    const int64_t offset = offset_t.scalar<int64_t>()();
    OP_REQUIRES(ctx, offset >= 0 && offset <= n - nb,
                absl::InvalidArgumentError(absl::StrCat(
                    "columns [", offset, ", ", offset + nb, ") are not all in acc's ", n,
                    " columns (acc ", acc.shape().DebugString(), ", block ",
                    block.shape().DebugString(), ")")));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, AccumulatorOutput<T>(ctx, &out));
    T* o = out->flat<T>().data();
    if (m == 0 || nb == 0) return;
    const T* b = block.flat<T>().data();
    using Sum = std::conditional_t<std::is_same_v<T, double>, double, float>;
    ctx->eigen_device<CPUDevice>().parallelFor(
        m, Eigen::TensorOpCost(2 * sizeof(T) * nb, sizeof(T) * nb, nb),
        [&](Eigen::Index begin, Eigen::Index end) {
          for (Eigen::Index i = begin; i < end; ++i) {
            T* row = o + i * n + offset;
            const T* src = b + i * nb;
            for (int64_t j = 0; j < nb; ++j) {
              row[j] = static_cast<T>(static_cast<Sum>(row[j]) + static_cast<Sum>(src[j]));
            }
          }
        });
  }
};

}  // namespace

#define TF_KLD_REGISTER_LINEAR_GRADS(T, Tw)                                                   \
  TF_KLD_REGISTER_KERNEL(Name("TfKld>AccumulateLinearGrads")                                  \
                             .Device(tensorflow::DEVICE_CPU)                                  \
                             .TypeConstraint<T>("T")                                          \
                             .TypeConstraint<Tw>("Tw"),                                       \
                         AccumulateLinearGradsOp<T, Tw>)

TF_KLD_REGISTER_LINEAR_GRADS(float, Eigen::half);
TF_KLD_REGISTER_LINEAR_GRADS(float, Eigen::bfloat16);
TF_KLD_REGISTER_LINEAR_GRADS(float, float);
TF_KLD_REGISTER_LINEAR_GRADS(double, double);
#undef TF_KLD_REGISTER_LINEAR_GRADS

#define TF_KLD_REGISTER_KERNEL_GRAD(T)                                                        \
  TF_KLD_REGISTER_KERNEL(Name("TfKld>AccumulateKernelGrad")                                   \
                             .Device(tensorflow::DEVICE_CPU)                                  \
                             .TypeConstraint<T>("T"),                                         \
                         AccumulateKernelGradOp<T>)

TF_KLD_REGISTER_KERNEL_GRAD(Eigen::half);
TF_KLD_REGISTER_KERNEL_GRAD(Eigen::bfloat16);
#undef TF_KLD_REGISTER_KERNEL_GRAD

#define TF_KLD_REGISTER_LINEAR_LOGITS(T, Tw)                                                  \
  TF_KLD_REGISTER_KERNEL(Name("TfKld>LinearLogits")                                           \
                             .Device(tensorflow::DEVICE_CPU)                                  \
                             .TypeConstraint<T>("T")                                          \
                             .TypeConstraint<Tw>("Tw"),                                       \
                         LinearLogitsOp<T, Tw>)

TF_KLD_REGISTER_LINEAR_LOGITS(float, Eigen::half);
TF_KLD_REGISTER_LINEAR_LOGITS(float, Eigen::bfloat16);
TF_KLD_REGISTER_LINEAR_LOGITS(float, float);
TF_KLD_REGISTER_LINEAR_LOGITS(double, double);
#undef TF_KLD_REGISTER_LINEAR_LOGITS

#define TF_KLD_REGISTER_ADD_COLUMNS(T)                                                        \
  TF_KLD_REGISTER_KERNEL(                                                                     \
      Name("TfKld>AddColumns").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),         \
      AddColumnsOp<T>)

TF_KLD_REGISTER_ADD_COLUMNS(Eigen::half);
TF_KLD_REGISTER_ADD_COLUMNS(Eigen::bfloat16);
TF_KLD_REGISTER_ADD_COLUMNS(float);
TF_KLD_REGISTER_ADD_COLUMNS(double);
#undef TF_KLD_REGISTER_ADD_COLUMNS

}  // namespace tf_kld
