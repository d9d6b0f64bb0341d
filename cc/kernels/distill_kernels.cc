// CPU OpKernels of the distillation family: TfKld>KlDivergenceWithLogits,
// TfKld>GeneralizedJsdWithLogits and their fused gradients.
#define EIGEN_USE_THREADS

#if GOOGLE_CUDA
#include "cc/kernels/distill_gpu.h"  // first: turns on Eigen's GPU device
#include "cc/kernels/kld_gpu_gate.h"
#endif

#include <algorithm>
#include <cmath>
#include <vector>

#include "cc/kernels/distill_attrs.h"
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


// Rows wider than this are split into chunks of this many classes, reduced in parallel and merged
// in chunk order: the split depends only on the shape, so results never depend on thread count.
constexpr int64_t kChunk = 32768;
// Rough cycles per element (a division, two exps, conversions), for the thread pool's cost model.
constexpr double kCyclesPerElement = 12.0;

Eigen::TensorOpCost Cost(int64_t elements, int64_t bytes_in, int64_t bytes_out) {
  return Eigen::TensorOpCost(static_cast<double>(bytes_in), static_cast<double>(bytes_out),
                             kCyclesPerElement * static_cast<double>(elements));
}

absl::Status CheckLogits(const Tensor& y_true, const Tensor& y_pred) {
  if (y_true.dims() < 1 || y_pred.dims() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have rank >= 1 (the loss reduces the last axis), got y_true ",
        y_true.shape().DebugString(), " and y_pred ", y_pred.shape().DebugString()));
  }
  if (y_true.shape() != y_pred.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have the same shape, got y_true ", y_true.shape().DebugString(),
        " and y_pred ", y_pred.shape().DebugString(), "; tf_kld broadcasts them before calling the op"));
  }
  return absl::OkStatus();
}

template <typename T>
T Round(double x) {
  return static_cast<T>(static_cast<float>(x));  // 16-bit types through float, as the composite
}
template <>
double Round<double>(double x) {
  return x;
}

TensorShape RowsShape(const Tensor& x) {
  TensorShape rows = x.shape();
  rows.RemoveLastDims(1);
  return rows;
}

// The forward op's checks and outputs, on any device: y_true and y_pred (inputs 0 and 1) of one
// shape; *loss the rows' shape, *stats [rows..., stats_per_row].
absl::Status ForwardOutputs(OpKernelContext* ctx, int stats_per_row, Tensor** loss, Tensor** stats) {
  const Tensor& y_true = ctx->input(0);
  TF_RETURN_IF_ERROR(CheckLogits(y_true, ctx->input(1)));
  const TensorShape rows_shape = RowsShape(y_true);
  TensorShape stats_shape = rows_shape;
  stats_shape.AddDim(stats_per_row);
  TF_RETURN_IF_ERROR(ctx->allocate_output(0, rows_shape, loss));
  return ctx->allocate_output(1, stats_shape, stats);
}

// The gradient op's checks and outputs, on any device: grad (input 0) of the loss's shape, y_true
// and y_pred (1, 2) of one shape, stats (3) the forward's; each output may take over the buffer of
// the input it is the gradient of (every element is read before its gradient is written, by the
// same thread), and one not needed has shape [0].
absl::Status GradientOutputs(OpKernelContext* ctx, int stats_per_row, bool need_true,
                             bool need_pred, Tensor** d_true, Tensor** d_pred) {
  const Tensor& grad = ctx->input(0);
  const Tensor& y_true = ctx->input(1);
  const Tensor& stats = ctx->input(3);
  TF_RETURN_IF_ERROR(CheckLogits(y_true, ctx->input(2)));
  const TensorShape rows_shape = RowsShape(y_true);
  if (grad.shape() != rows_shape) {
    return absl::InvalidArgumentError(absl::StrCat("grad must have the loss's shape ",
                                                   rows_shape.DebugString(), ", got ",
                                                   grad.shape().DebugString()));
  }
  TensorShape stats_shape = rows_shape;
  stats_shape.AddDim(stats_per_row);
  if (stats.shape() != stats_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stats must have shape ", stats_shape.DebugString(),
        " (the forward op's second output), got ", stats.shape().DebugString()));
  }
  const TensorShape none({0});
  TF_RETURN_IF_ERROR(
      ctx->forward_input_or_allocate_output({1}, 0, need_true ? y_true.shape() : none, d_true));
  return ctx->forward_input_or_allocate_output({2}, 1, need_pred ? y_true.shape() : none, d_pred);
}

// The block ops' checks and first outputs: y_true and y_pred (inputs 0, 1) matrices of one shape,
// the carried input 2 (`name`) [rows, width]; *carried_out (output 0) may take over its buffer,
// *loss (output 1) [rows].
absl::Status BlockOutputs(OpKernelContext* ctx, int width, const char* name, Tensor** carried_out,
                          Tensor** loss) {
  const Tensor& y_true = ctx->input(0);
  const Tensor& y_pred = ctx->input(1);
  const Tensor& carried = ctx->input(2);
  if (y_true.dims() != 2 || y_true.shape() != y_pred.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must be matrices of one shape [rows, block], got y_true ",
        y_true.shape().DebugString(), " and y_pred ", y_pred.shape().DebugString()));
  }
  const int64_t rows = y_true.dim_size(0);
  if (carried.dims() != 2 || carried.dim_size(0) != rows || carried.dim_size(1) != width) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must have shape [", rows, ", ", width,
                                                   "] (y_true's rows), got ",
                                                   carried.shape().DebugString()));
  }
  TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({2}, 0, carried.shape(), carried_out));
  return ctx->allocate_output(1, TensorShape({rows}), loss);
}

template <typename T>
class KlDivergenceWithLogitsOp : public OpKernel {
 public:
  explicit KlDivergenceWithLogitsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(temperature_, ctx, ReadTemperature(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    Tensor* loss_t = nullptr;
    Tensor* stats_t = nullptr;
    OP_REQUIRES_OK(ctx, ForwardOutputs(ctx, distill::kStats, &loss_t, &stats_t));
    const int64_t rows = loss_t->NumElements();
    const int64_t cols = y_true.dim_size(y_true.dims() - 1);
    if (rows == 0) return;
    T* loss = loss_t->flat<T>().data();
    double* stats = stats_t->flat<double>().data();
    if (cols == 0) {  // an empty sum
      for (int64_t r = 0; r < rows; ++r) loss[r] = T(0);
      for (int64_t i = 0; i < rows * distill::kStats; ++i) stats[i] = 0.0;
      return;
    }
    const T* t = y_true.flat<T>().data();
    const T* p = y_pred.flat<T>().data();
    const distill::Kernels& k = distill::Cpu();
    constexpr cpu::Type type = CpuType<T>::value;
    const double temperature = temperature_;
    const CPUDevice& d = ctx->eigen_device<CPUDevice>();
    if (type != cpu::Type::kDouble && cols <= k.narrow_cols) {  // many rows per SIMD register
      d.parallelFor(rows, Cost(cols, 2 * cols * sizeof(T), sizeof(T) + 8 * distill::kStats),
                    [&](Eigen::Index begin, Eigen::Index end) {
                      constexpr int64_t kBlock = 512;  // rows whose stats are still in cache
                      for (Eigen::Index r0 = begin; r0 < end; r0 += kBlock) {
                        const int64_t n = std::min<int64_t>(kBlock, end - r0);
                        k.kl_rows_narrow(type, t + r0 * cols, p + r0 * cols, n, cols, temperature,
                                         stats + r0 * distill::kStats);
                        for (int64_t r = r0; r < r0 + n; ++r) {
                          loss[r] = Round<T>(stats[r * distill::kStats + 4]);
                        }
                      }
                    });
      return;
    }
    if (cols <= kChunk) {
      d.parallelFor(rows, Cost(cols, 2 * cols * sizeof(T), sizeof(T) + 8 * distill::kStats),
                    [&](Eigen::Index begin, Eigen::Index end) {
                      for (Eigen::Index r = begin; r < end; ++r) {
                        const distill::KlPartial s =
                            k.kl_partial(type, t + r * cols, p + r * cols, cols, temperature);
                        loss[r] = Round<T>(distill::Finish(s, stats + r * distill::kStats));
                      }
                    });
      return;
    }
    const int64_t chunks = (cols + kChunk - 1) / kChunk;
    std::vector<distill::KlPartial> partial(rows * chunks);
    d.parallelFor(rows * chunks, Cost(kChunk, 2 * kChunk * sizeof(T), sizeof(distill::KlPartial)),
                  [&](Eigen::Index begin, Eigen::Index end) {
                    for (Eigen::Index item = begin; item < end; ++item) {
                      const int64_t start = (item % chunks) * kChunk;
                      const int64_t offset = (item / chunks) * cols + start;
                      partial[item] = k.kl_partial(type, t + offset, p + offset,
                                                   std::min(kChunk, cols - start), temperature);
                    }
                  });
    for (int64_t r = 0; r < rows; ++r) {
      distill::KlPartial s = partial[r * chunks];
      for (int64_t c = 1; c < chunks; ++c) s = distill::Merge(s, partial[r * chunks + c]);
      loss[r] = Round<T>(distill::Finish(s, stats + r * distill::kStats));
    }
  }

 private:
  double temperature_ = 1.0;
};

// TfKld>KlDivergenceWithLogitsBlock: the next block of columns of each row merged into the rows'
// running states (in order, as the op above merges its chunks of a wide row), and the loss and
// stats of the columns seen so far.
template <typename T>
class KlDivergenceWithLogitsBlockOp : public OpKernel {
 public:
  explicit KlDivergenceWithLogitsBlockOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(temperature_, ctx, ReadTemperature(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    const Tensor& state = ctx->input(2);
    Tensor* state_out = nullptr;
    Tensor* loss_t = nullptr;
    Tensor* stats_t = nullptr;
    OP_REQUIRES_OK(ctx, BlockOutputs(ctx, distill::kBlockState, "state", &state_out, &loss_t));
    const int64_t rows = y_true.dim_size(0), cols = y_true.dim_size(1);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({rows, distill::kStats}), &stats_t));
    if (rows == 0) return;
    const T* t = y_true.flat<T>().data();
    const T* p = y_pred.flat<T>().data();
    const double* in = state.flat<double>().data();
    double* out = state_out->flat<double>().data();
    T* loss = loss_t->flat<T>().data();
    double* stats = stats_t->flat<double>().data();
    const distill::Kernels& k = distill::Cpu();
    constexpr cpu::Type type = CpuType<T>::value;
    const double temperature = temperature_;
    ctx->eigen_device<CPUDevice>().parallelFor(
        rows, Cost(cols, 2 * cols * sizeof(T), sizeof(T) + 8 * (distill::kStats + distill::kBlockState)),
        [&](Eigen::Index begin, Eigen::Index end) {
          for (Eigen::Index r = begin; r < end; ++r) {
            distill::KlPartial s = distill::Load(in + r * distill::kBlockState);
            for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {  // the full op's chunks of wide rows
              s = distill::Merge(s, k.kl_partial(type, t + r * cols + c0, p + r * cols + c0,
                                                 std::min(kChunk, cols - c0), temperature));
            }
            distill::Save(s, out + r * distill::kBlockState);
            loss[r] = Round<T>(distill::Finish(s, stats + r * distill::kStats));
          }
        });
  }

 private:
  double temperature_ = 1.0;
};

// TfKld>GeneralizedJsdWithLogitsBlock: the next block of columns' second-pass sums added to the
// rows' state (given their whole-row first four stats): kJsdStats stats and then the loss's sum
// (kJsdBlockState in all), and the JSD of the sums so far.
template <typename T>
class GeneralizedJsdWithLogitsBlockOp : public OpKernel {
 public:
  explicit GeneralizedJsdWithLogitsBlockOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(params_, ctx, ReadJsdParams(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    constexpr int kS = distill::kJsdBlockState;
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    const Tensor& stats = ctx->input(2);
    Tensor* stats_out = nullptr;
    Tensor* loss_t = nullptr;
    OP_REQUIRES_OK(ctx, BlockOutputs(ctx, kS, "stats", &stats_out, &loss_t));
    const int64_t rows = y_true.dim_size(0), cols = y_true.dim_size(1);
    if (rows == 0) return;
    const T* t = y_true.flat<T>().data();
    const T* p = y_pred.flat<T>().data();
    const double* in = stats.flat<double>().data();
    double* out = stats_out->flat<double>().data();
    T* loss = loss_t->flat<T>().data();
    const distill::Kernels& k = distill::Cpu();
    constexpr cpu::Type type = CpuType<T>::value;
    const distill::JsdParams params = params_;
    ctx->eigen_device<CPUDevice>().parallelFor(
        rows, Cost(2 * cols, 2 * cols * sizeof(T), sizeof(T) + 16 * kS),
        [&](Eigen::Index begin, Eigen::Index end) {
          for (Eigen::Index r = begin; r < end; ++r) {
            double* st = out + r * kS;
            if (st != in + r * kS) std::copy(in + r * kS, in + (r + 1) * kS, st);
            double total[distill::kJsdSums] = {st[4], st[5], st[6]};
            for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {  // the full op's chunks of wide rows
              double sums[distill::kJsdSums] = {};
              k.jsd_sums(type, t + r * cols + c0, p + r * cols + c0, std::min(kChunk, cols - c0),
                         params, st, sums);
              for (int j = 0; j < distill::kJsdSums; ++j) total[j] += sums[j];
            }
            loss[r] = Round<T>(distill::FinishJsd(total, st));
            st[6] = total[2];
          }
        });
  }

 private:
  distill::JsdParams params_{};
};

// What differs between the families' gradient ops: the stats per row, the parameters, the core call.
struct KlFamily {
  static constexpr int kStats = distill::kStats;
  using Params = double;  // the temperature
  static absl::StatusOr<Params> Read(OpKernelConstruction* ctx) { return ReadTemperature(ctx); }
  static void Gradient(cpu::Type type, const void* g, const void* t, const void* p, const double* s,
                       void* dt, void* dp, int64_t begin, int64_t end, int64_t cols,
                       const Params& params) {
    distill::Cpu().kl_gradient(type, g, t, p, s, dt, dp, begin, end, cols, params);
  }
};

struct JsdFamily {
  static constexpr int kStats = distill::kJsdStats;
  using Params = distill::JsdParams;
  static absl::StatusOr<Params> Read(OpKernelConstruction* ctx) { return ReadJsdParams(ctx); }
  static void Gradient(cpu::Type type, const void* g, const void* t, const void* p, const double* s,
                       void* dt, void* dp, int64_t begin, int64_t end, int64_t cols,
                       const Params& params) {
    distill::Cpu().jsd_gradient(type, g, t, p, s, dt, dp, begin, end, cols, params);
  }
};

// The fused gradient of either family: d/dy_true and/or d/dy_pred in one pass from the stats.
template <typename T, typename Family>
class DistillGradOp : public OpKernel {
 public:
  explicit DistillGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(params_, ctx, Family::Read(ctx));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("need_y_true", &need_true_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("need_y_pred", &need_pred_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& y_true = ctx->input(1);
    const Tensor& y_pred = ctx->input(2);
    const Tensor& stats = ctx->input(3);
    Tensor* d_true = nullptr;
    Tensor* d_pred = nullptr;
    OP_REQUIRES_OK(ctx, GradientOutputs(ctx, Family::kStats, need_true_, need_pred_, &d_true, &d_pred));
    const int64_t elements = y_true.NumElements();
    if (elements == 0 || (!need_true_ && !need_pred_)) return;
    const int64_t cols = y_true.dim_size(y_true.dims() - 1);
    const T* g = grad.flat<T>().data();
    const T* t = y_true.flat<T>().data();
    const T* p = y_pred.flat<T>().data();
    const double* s = stats.flat<double>().data();
    T* dt = need_true_ ? d_true->flat<T>().data() : nullptr;
    T* dp = need_pred_ ? d_pred->flat<T>().data() : nullptr;
    const typename Family::Params params = params_;
    const int outputs = (need_true_ ? 1 : 0) + (need_pred_ ? 1 : 0);
    // Blocks of whole SIMD vectors, so only a block's last vector can be partial.
    ctx->eigen_device<CPUDevice>().parallelFor(
        elements, Cost(1, 2 * sizeof(T), outputs * sizeof(T)),
        [](Eigen::Index n) { return (n + 63) & ~Eigen::Index{63}; },
        [&](Eigen::Index begin, Eigen::Index end) {
          Family::Gradient(CpuType<T>::value, g, t, p, s, dt, dp, begin, end, cols, params);
        });
  }

 private:
  typename Family::Params params_{};
  bool need_true_ = true;
  bool need_pred_ = true;
};

template <typename T>
class GeneralizedJsdWithLogitsOp : public OpKernel {
 public:
  explicit GeneralizedJsdWithLogitsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(params_, ctx, ReadJsdParams(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    constexpr int kS = distill::kJsdStats;
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    Tensor* loss_t = nullptr;
    Tensor* stats_t = nullptr;
    OP_REQUIRES_OK(ctx, ForwardOutputs(ctx, kS, &loss_t, &stats_t));
    const int64_t rows = loss_t->NumElements();
    const int64_t cols = y_true.dim_size(y_true.dims() - 1);
    if (rows == 0) return;
    T* loss = loss_t->flat<T>().data();
    double* stats = stats_t->flat<double>().data();
    if (cols == 0) {
      for (int64_t r = 0; r < rows; ++r) loss[r] = T(0);
      for (int64_t i = 0; i < rows * kS; ++i) stats[i] = 0.0;
      return;
    }
    const T* t = y_true.flat<T>().data();
    const T* p = y_pred.flat<T>().data();
    const distill::Kernels& k = distill::Cpu();
    constexpr cpu::Type type = CpuType<T>::value;
    const distill::JsdParams params = params_;
    const CPUDevice& d = ctx->eigen_device<CPUDevice>();
    // The first pass's state of a row -> its first four stats.
    auto first_stats = [](const distill::KlPartial& s, double* st) {
      double kl_stats[distill::kStats];
      distill::Finish(s, kl_stats);
      for (int j = 0; j < 4; ++j) st[j] = kl_stats[j];
    };
    if (type != cpu::Type::kDouble && cols <= k.narrow_cols) {  // many rows per SIMD register
      d.parallelFor(rows, Cost(2 * cols, 2 * cols * sizeof(T), sizeof(T) + 8 * kS),
                    [&](Eigen::Index begin, Eigen::Index end) {
                      constexpr int64_t kBlock = 512;  // rows whose stats are still in cache
                      double kl_stats[kBlock * distill::kStats], sums[distill::kJsdSums * kBlock];
                      for (Eigen::Index r0 = begin; r0 < end; r0 += kBlock) {
                        const int64_t n = std::min<int64_t>(kBlock, end - r0);
                        const T* rt = t + r0 * cols;
                        const T* rp = p + r0 * cols;
                        double* st = stats + r0 * kS;
                        k.kl_rows_narrow(type, rt, rp, n, cols, params.temperature, kl_stats);
                        for (int64_t i = 0; i < n; ++i) {
                          for (int j = 0; j < 4; ++j) st[i * kS + j] = kl_stats[i * distill::kStats + j];
                        }
                        k.jsd_sums_narrow(type, rt, rp, n, cols, params, st, sums);
                        for (int64_t i = 0; i < n; ++i) {
                          loss[r0 + i] = Round<T>(
                              distill::FinishJsd(sums + distill::kJsdSums * i, st + i * kS));
                        }
                      }
                    });
      return;
    }
    if (cols <= kChunk) {
      d.parallelFor(rows, Cost(2 * cols, 2 * cols * sizeof(T), sizeof(T) + 8 * kS),
                    [&](Eigen::Index begin, Eigen::Index end) {
                      for (Eigen::Index r = begin; r < end; ++r) {
                        double* st = stats + r * kS;
                        first_stats(k.kl_partial(type, t + r * cols, p + r * cols, cols,
                                                 params.temperature), st);
                        double sums[distill::kJsdSums] = {};
                        k.jsd_sums(type, t + r * cols, p + r * cols, cols, params, st, sums);
                        loss[r] = Round<T>(distill::FinishJsd(sums, st));
                      }
                    });
      return;
    }
    const int64_t chunks = (cols + kChunk - 1) / kChunk;
    std::vector<distill::KlPartial> partial(rows * chunks);
    d.parallelFor(rows * chunks, Cost(kChunk, 2 * kChunk * sizeof(T), sizeof(distill::KlPartial)),
                  [&](Eigen::Index begin, Eigen::Index end) {
                    for (Eigen::Index item = begin; item < end; ++item) {
                      const int64_t start = (item % chunks) * kChunk;
                      const int64_t offset = (item / chunks) * cols + start;
                      partial[item] = k.kl_partial(type, t + offset, p + offset,
                                                   std::min(kChunk, cols - start), params.temperature);
                    }
                  });
    for (int64_t r = 0; r < rows; ++r) {
      distill::KlPartial s = partial[r * chunks];
      for (int64_t c = 1; c < chunks; ++c) s = distill::Merge(s, partial[r * chunks + c]);
      first_stats(s, stats + r * kS);
    }
    std::vector<double> sums(rows * chunks * distill::kJsdSums, 0.0);
    d.parallelFor(rows * chunks, Cost(kChunk, 2 * kChunk * sizeof(T), 16),
                  [&](Eigen::Index begin, Eigen::Index end) {
                    for (Eigen::Index item = begin; item < end; ++item) {
                      const int64_t row = item / chunks, start = (item % chunks) * kChunk;
                      const int64_t offset = row * cols + start;
                      k.jsd_sums(type, t + offset, p + offset, std::min(kChunk, cols - start),
                                 params, stats + row * kS, &sums[distill::kJsdSums * item]);
                    }
                  });
    for (int64_t r = 0; r < rows; ++r) {
      double total[distill::kJsdSums] = {};
      for (int64_t c = 0; c < chunks; ++c) {
        for (int j = 0; j < distill::kJsdSums; ++j) total[j] += sums[distill::kJsdSums * (r * chunks + c) + j];
      }
      loss[r] = Round<T>(distill::FinishJsd(total, stats + r * kS));
    }
  }

 private:
  distill::JsdParams params_{};
};

#if GOOGLE_CUDA
// ---- GPU kernels (CUDA builds only; the launchers are in distill_kernels.cu.cc) --------------

using GPUDevice = Eigen::GpuDevice;

absl::Status GpuLaunchStatus(const char* err) {
  if (err == nullptr) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(
      "tf_kld: a CUDA kernel launch failed: ", err, ". The library has kernels for CUDA architectures ",
      TfKldCudaArchs(), " (TF_KLD_CUDA_ARCHS at build time); see tf_kld.gpu_info()"));
}

// The attrs of either family as the launchers take them.
template <bool kJsd>
absl::StatusOr<distill_gpu::Params> ReadGpuParams(OpKernelConstruction* ctx) {
  distill_gpu::Params params;
  if (kJsd) {
    distill::JsdParams jsd;
    TF_ASSIGN_OR_RETURN(jsd, ReadJsdParams(ctx));
    params.temperature = jsd.temperature, params.beta = jsd.beta, params.jsd = true;
  } else {
    TF_ASSIGN_OR_RETURN(params.temperature, ReadTemperature(ctx));
  }
  return params;
}

// The forward op of either family on the GPU: loss and stats, the same shapes as on the CPU.
template <typename T, bool kJsd>
class DistillGpuOp : public OpKernel {
 public:
  explicit DistillGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(params_, ctx, ReadGpuParams<kJsd>(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    Tensor* loss = nullptr;
    Tensor* stats = nullptr;
    OP_REQUIRES_OK(ctx, ForwardOutputs(ctx, kJsd ? distill::kJsdStats : distill::kStats, &loss, &stats));
    const int64_t rows = loss->NumElements();
    if (rows == 0) return;
    OP_REQUIRES_OK(ctx, GpuLaunchStatus(distill_gpu::Launchers<T>::Forward(
                            ctx->eigen_device<GPUDevice>(), params_, y_true.flat<T>().data(),
                            y_pred.flat<T>().data(), loss->flat<T>().data(), stats->flat<double>().data(),
                            rows, y_true.dim_size(y_true.dims() - 1))));
  }

 private:
  distill_gpu::Params params_;
};

// The fused gradient of either family on the GPU, with the CPU op's checks (GradientOutputs).
template <typename T, bool kJsd>
class DistillGradGpuOp : public OpKernel {
 public:
  explicit DistillGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(params_, ctx, ReadGpuParams<kJsd>(ctx));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("need_y_true", &need_true_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("need_y_pred", &need_pred_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& y_true = ctx->input(1);
    const Tensor& y_pred = ctx->input(2);
    const Tensor& stats = ctx->input(3);
    Tensor* d_true = nullptr;
    Tensor* d_pred = nullptr;
    OP_REQUIRES_OK(ctx, GradientOutputs(ctx, kJsd ? distill::kJsdStats : distill::kStats, need_true_,
                                        need_pred_, &d_true, &d_pred));
    if (y_true.NumElements() == 0 || (!need_true_ && !need_pred_)) return;
    OP_REQUIRES_OK(ctx, GpuLaunchStatus(distill_gpu::Launchers<T>::Gradient(
                            ctx->eigen_device<GPUDevice>(), params_, grad.flat<T>().data(),
                            y_true.flat<T>().data(), y_pred.flat<T>().data(), stats.flat<double>().data(),
                            need_true_ ? d_true->flat<T>().data() : nullptr,
                            need_pred_ ? d_pred->flat<T>().data() : nullptr, grad.NumElements(),
                            y_true.dim_size(y_true.dims() - 1))));
  }

 private:
  distill_gpu::Params params_;
  bool need_true_ = true;
  bool need_pred_ = true;
};

// Through RegisterKernelOnce (kld_registration.h), where the driver gate allows, as the KL ops'.
template <typename T>
void RegisterDistillGpuKernels() {
  using tensorflow::register_kernel::Name;
  auto gpu = [](const char* op) { return Name(op).Device(tensorflow::DEVICE_GPU).TypeConstraint<T>("T").Build(); };
  RegisterKernelOnce<DistillGpuOp<T, false>>(gpu("TfKld>KlDivergenceWithLogits"), "DistillGpuOp");
  RegisterKernelOnce<DistillGradGpuOp<T, false>>(gpu("TfKld>KlDivergenceWithLogitsGrad"), "DistillGradGpuOp");
  RegisterKernelOnce<DistillGpuOp<T, true>>(gpu("TfKld>GeneralizedJsdWithLogits"), "DistillGpuOp");
  RegisterKernelOnce<DistillGradGpuOp<T, true>>(gpu("TfKld>GeneralizedJsdWithLogitsGrad"), "DistillGradGpuOp");
}

const bool distill_gpu_kernels_registered [[maybe_unused]] = [] {
  if (!GpuGateAtLoad().register_kernels) return false;
  RegisterDistillGpuKernels<Eigen::half>();
  RegisterDistillGpuKernels<Eigen::bfloat16>();
  RegisterDistillGpuKernels<float>();
  RegisterDistillGpuKernels<double>();
  return true;
}();
#endif  // GOOGLE_CUDA

}  // namespace

#define TF_KLD_REGISTER_DISTILL_CPU(T)                                                         \
  TF_KLD_REGISTER_KERNEL(                                                                     \
      Name("TfKld>KlDivergenceWithLogits").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      KlDivergenceWithLogitsOp<T>);                                                            \
  TF_KLD_REGISTER_KERNEL(Name("TfKld>KlDivergenceWithLogitsBlock")                            \
                              .Device(tensorflow::DEVICE_CPU)                                  \
                              .TypeConstraint<T>("T"),                                         \
                          KlDivergenceWithLogitsBlockOp<T>);                                   \
  TF_KLD_REGISTER_KERNEL(Name("TfKld>KlDivergenceWithLogitsGrad")                             \
                              .Device(tensorflow::DEVICE_CPU)                                  \
                              .TypeConstraint<T>("T"),                                         \
                          DistillGradOp<T, KlFamily>);                                         \
  TF_KLD_REGISTER_KERNEL(Name("TfKld>GeneralizedJsdWithLogits")                               \
                              .Device(tensorflow::DEVICE_CPU)                                  \
                              .TypeConstraint<T>("T"),                                         \
                          GeneralizedJsdWithLogitsOp<T>);                                      \
  TF_KLD_REGISTER_KERNEL(Name("TfKld>GeneralizedJsdWithLogitsBlock")                          \
                              .Device(tensorflow::DEVICE_CPU)                                  \
                              .TypeConstraint<T>("T"),                                         \
                          GeneralizedJsdWithLogitsBlockOp<T>);                                 \
  TF_KLD_REGISTER_KERNEL(Name("TfKld>GeneralizedJsdWithLogitsGrad")                           \
                              .Device(tensorflow::DEVICE_CPU)                                  \
                              .TypeConstraint<T>("T"),                                         \
                          DistillGradOp<T, JsdFamily>);

TF_KLD_REGISTER_DISTILL_CPU(Eigen::half);
TF_KLD_REGISTER_DISTILL_CPU(Eigen::bfloat16);
TF_KLD_REGISTER_DISTILL_CPU(float);
TF_KLD_REGISTER_DISTILL_CPU(double);
#undef TF_KLD_REGISTER_DISTILL_CPU

}  // namespace tf_kld

// The distillation core's vectorised exp over n floats (for tests of its accuracy; read with ctypes).
extern "C" __attribute__((visibility("default"))) void TfKldDistillExp(const float* x, float* out,
                                                                       int64_t n) {
  tf_kld::distill::Cpu().exp(x, out, n);
}

// The same for the form the loops use on arguments <= 0 (the same bits as the above there).
extern "C" __attribute__((visibility("default"))) void TfKldDistillExpNonPositive(const float* x,
                                                                                  float* out,
                                                                                  int64_t n) {
  tf_kld::distill::Cpu().exp_nonpositive(x, out, n);
}

// The double log the narrow rows' statistics take (for tests of its accuracy).
extern "C" __attribute__((visibility("default"))) void TfKldDistillLog(const double* x, double* out,
                                                                       int64_t n) {
  tf_kld::distill::Cpu().log(x, out, n);
}

// The double exp that moves the KL's running sums to a new maximum (for tests of its accuracy).
extern "C" __attribute__((visibility("default"))) void TfKldDistillExpDouble(const double* x, double* out,
                                                                             int64_t n) {
  tf_kld::distill::Cpu().exp_double(x, out, n);
}
