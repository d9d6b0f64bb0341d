// CPU specialisation of the KL-divergence functors and the OpKernels for both ops.
#define EIGEN_USE_THREADS

#if GOOGLE_CUDA
#include "cc/kernels/kld_gpu.h"  // first: turns on Eigen's GPU device
#include "cc/kernels/kld_gpu_gate.h"
#endif

#include <sys/mman.h>

#include <cmath>
#include <string>
#include <vector>

#include "cc/kernels/kld.h"
#include "cc/kernels/kld_attrs.h"
#include "cc/kernels/kld_cpu.h"
#include "cc/kernels/kld_registration.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "cc/kernels/cpu_type_of.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tf_kld {

using CPUDevice = Eigen::ThreadPoolDevice;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

namespace {


// Rows wider than this are summed in fixed chunks in parallel, so a few very wide rows still use
// every core. The chunking depends only on the shape, so results do not depend on thread count.
constexpr int64_t kChunk = 32768;
// Rough cycles per element (one log, one division, conversions), for the thread pool's cost model.
constexpr double kCyclesPerElement = 6.0;

Eigen::TensorOpCost Cost(int64_t elements_per_item, int64_t bytes_in, int64_t bytes_out) {
  return Eigen::TensorOpCost(static_cast<double>(bytes_in), static_cast<double>(bytes_out),
                             kCyclesPerElement * static_cast<double>(elements_per_item));
}

// The loss of one row from a double sum, rounded once to T (through float for 16-bit types).
template <typename T>
T FromSum(double sum) {
  return static_cast<T>(static_cast<float>(sum));
}
template <>
double FromSum<double>(double sum) {
  return sum;
}

// Large fresh outputs are backed by transparent huge pages where the kernel allows it: TensorFlow's
// allocator maps new memory for big tensors, and faulting it in 4 KiB pages costs more than
// computing the gradient. A no-op where THP is off or the memory is already in use.
void AdviseHugePages(void* data, int64_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < int64_t{2} << 20) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

}  // namespace

template <typename T>
struct KlDivergenceFunctor<CPUDevice, T> {
  void operator()(const CPUDevice& d, const T* y_true, const T* y_pred, T* loss, int64_t rows,
                  int64_t cols, double eps) const {
    const cpu::Kernels& k = cpu::Cpu();
    constexpr cpu::Type type = CpuType<T>::value;
    AdviseHugePages(loss, rows * static_cast<int64_t>(sizeof(T)));
    if (cols <= kChunk) {
      d.parallelFor(rows, Cost(cols, 2 * cols * sizeof(T), sizeof(T)),
                    [&](Eigen::Index begin, Eigen::Index end) {
                      k.forward_rows(type, y_true, y_pred, loss, begin, end, cols, eps);
                    });
      return;
    }
    const int64_t chunks = (cols + kChunk - 1) / kChunk;
    std::vector<double> partial(rows * chunks);
    d.parallelFor(rows * chunks, Cost(kChunk, 2 * kChunk * sizeof(T), sizeof(double)),
                  [&](Eigen::Index begin, Eigen::Index end) {
                    for (Eigen::Index item = begin; item < end; ++item) {
                      const int64_t row = item / chunks, start = (item % chunks) * kChunk;
                      const int64_t n = std::min<int64_t>(kChunk, cols - start);
                      const int64_t offset = row * cols + start;
                      partial[item] = k.sum_terms(type, y_true + offset, y_pred + offset, n, eps);
                    }
                  });
    for (int64_t row = 0; row < rows; ++row) {
      double sum = 0.0;
      for (int64_t c = 0; c < chunks; ++c) sum += partial[row * chunks + c];
      loss[row] = FromSum<T>(sum);
    }
  }
};

template <typename T>
struct KlDivergenceGradFunctor<CPUDevice, T> {
  void operator()(const CPUDevice& d, const T* grad, const T* y_true, const T* y_pred, T* out,
                  int64_t rows, int64_t cols, double eps, Wrt wrt) const {
    const cpu::Kernels& k = cpu::Cpu();
    const bool wrt_true = wrt == Wrt::kYTrue;
    AdviseHugePages(out, rows * cols * static_cast<int64_t>(sizeof(T)));
    // Blocks of whole SIMD vectors, so only a block's last vector can be partial.
    d.parallelFor(rows * cols, Cost(1, 2 * sizeof(T), sizeof(T)),
                  [](Eigen::Index n) { return (n + 63) & ~Eigen::Index{63}; },
                  [&](Eigen::Index begin, Eigen::Index end) {
                    k.gradient(CpuType<T>::value, grad, y_true, y_pred, out, begin, end, cols, eps,
                               wrt_true);
                  });
  }
};

namespace {

// Shared checks: y_true and y_pred of one shape, rank >= 1.
absl::Status CheckInputs(const Tensor& y_true, const Tensor& y_pred) {
  if (y_true.dims() < 1 || y_pred.dims() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have rank >= 1 (the loss reduces the last axis), got y_true ",
        y_true.shape().DebugString(), " and y_pred ", y_pred.shape().DebugString()));
  }
  if (y_true.shape() != y_pred.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have the same shape, got y_true ", y_true.shape().DebugString(),
        " and y_pred ", y_pred.shape().DebugString(),
        "; tf_kld.kl_divergence broadcasts them before calling the op"));
  }
  return absl::OkStatus();
}

}  // namespace

template <typename Device, typename T>
class KlDivergenceOp : public OpKernel {
 public:
  explicit KlDivergenceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(eps_, ctx, ReadEpsilon(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& y_true = ctx->input(0);
    const Tensor& y_pred = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckInputs(y_true, y_pred));
    TensorShape loss_shape = y_true.shape();
    loss_shape.RemoveLastDims(1);
    Tensor* loss = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, loss_shape, &loss));
    const int64_t rows = loss_shape.num_elements();
    if (rows == 0) return;
    Forward(ctx, y_true.flat<T>().data(), y_pred.flat<T>().data(), loss->flat<T>().data(), rows,
            y_true.dim_size(y_true.dims() - 1));
  }

 protected:
  // The GPU kernel overrides it to give the functor scratch memory from allocate_temp.
  virtual void Forward(OpKernelContext* ctx, const T* y_true, const T* y_pred, T* loss, int64_t rows,
                       int64_t cols) {
    KlDivergenceFunctor<Device, T>()(ctx->eigen_device<Device>(), y_true, y_pred, loss, rows, cols, eps_);
  }

  double eps_ = 0.0;
};

template <typename Device, typename T>
class KlDivergenceGradOp : public OpKernel {
 public:
  explicit KlDivergenceGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_VALUE(eps_, ctx, ReadEpsilon(ctx));
    OP_REQUIRES_VALUE(wrt_, ctx, ReadWrt(ctx));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& y_true = ctx->input(1);
    const Tensor& y_pred = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckInputs(y_true, y_pred));
    TensorShape loss_shape = y_true.shape();
    loss_shape.RemoveLastDims(1);
    OP_REQUIRES(ctx, grad.shape() == loss_shape,
                absl::InvalidArgumentError(absl::StrCat(
                    "grad must have the loss's shape ", loss_shape.DebugString(),
                    " (y_true/y_pred shape ", y_true.shape().DebugString(),
                    " without the last axis), got ", grad.shape().DebugString())));
    Tensor* out = nullptr;
    // The output may take over the buffer of the input it is the gradient of (read once, in place).
    const int reuse = wrt_ == Wrt::kYTrue ? 1 : 2;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({reuse}, 0, y_true.shape(), &out));
    if (y_true.NumElements() == 0) return;
    KlDivergenceGradFunctor<Device, T>()(ctx->eigen_device<Device>(), grad.flat<T>().data(),
                                         y_true.flat<T>().data(), y_pred.flat<T>().data(),
                                         out->flat<T>().data(), loss_shape.num_elements(),
                                         y_true.dim_size(y_true.dims() - 1), eps_, wrt_);
  }

 private:
  double eps_ = 0.0;
  Wrt wrt_;
};

#define TF_KLD_REGISTER_CPU(T)                                                              \
  TF_KLD_REGISTER_KERNEL(                                                                   \
      Name("TfKld>KlDivergence").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),    \
      KlDivergenceOp<CPUDevice, T>);                                                        \
  TF_KLD_REGISTER_KERNEL(                                                                   \
      Name("TfKld>KlDivergenceGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      KlDivergenceGradOp<CPUDevice, T>);

TF_KLD_REGISTER_CPU(Eigen::half);
TF_KLD_REGISTER_CPU(Eigen::bfloat16);
TF_KLD_REGISTER_CPU(float);
TF_KLD_REGISTER_CPU(double);
#undef TF_KLD_REGISTER_CPU

}  // namespace tf_kld

// ---- GPU kernels (CUDA builds only; the functors are in kld_kernels.cu.cc) -------------------
#if GOOGLE_CUDA
namespace tf_kld {
namespace {

absl::Status GpuLaunchStatus() {
  if (const char* err = gpu::TakeLaunchError()) {
    return absl::InternalError(absl::StrCat(
        "tf_kld: a CUDA kernel launch failed: ", err,
        ". The library has kernels for CUDA architectures ", TfKldCudaArchs(),
        " (TF_KLD_CUDA_ARCHS at build time); see tf_kld.gpu_info()"));
  }
  return absl::OkStatus();
}

}  // namespace

// An OpKernel whose Compute then reports a failed CUDA launch as the op's error.
template <typename Base>
class GpuLaunchChecked : public Base {
 public:
  using Base::Base;

  void Compute(OpKernelContext* ctx) override {
    Base::Compute(ctx);
    OP_REQUIRES_OK(ctx, GpuLaunchStatus());
  }
};

template <typename T>
class KlDivergenceGpuOp : public GpuLaunchChecked<KlDivergenceOp<GPUDevice, T>> {
 public:
  using GpuLaunchChecked<KlDivergenceOp<GPUDevice, T>>::GpuLaunchChecked;

 protected:
  void Forward(OpKernelContext* ctx, const T* y_true, const T* y_pred, T* loss, int64_t rows,
               int64_t cols) override {
    KlDivergenceFunctor<GPUDevice, T> functor;
    // TensorFlow's allocator orders the reuse of temporaries on the op's stream: the buffer may
    // be released when Compute returns, before the kernels ran.
    Tensor scratch;
    if (const int64_t bytes = functor.ScratchBytes(rows, cols)) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_DOUBLE,
                                             TensorShape({bytes / static_cast<int64_t>(sizeof(double))}),
                                             &scratch));
      functor.scratch = scratch.flat<double>().data();
    }
    functor(ctx->eigen_device<GPUDevice>(), y_true, y_pred, loss, rows, cols, this->eps_);
  }
};

template <typename T>
using KlDivergenceGradGpuOp = GpuLaunchChecked<KlDivergenceGradOp<GPUDevice, T>>;

// The driver gate, decided once when the library loads (kld_gpu_gate.h).
const GpuGateDecision& GpuGateAtLoad() {
  static const GpuGateDecision decision =
      GpuGate(ProbeDriverVersion(), ProbeGpuCount(), gpu::NeededDriverVersion());
  return decision;
}

namespace {

// Through RegisterKernelOnce (kld_registration.h): a second copy of the library adds nothing.
template <typename T>
void RegisterGpuKernels() {
  using tensorflow::register_kernel::Name;
  RegisterKernelOnce<KlDivergenceGpuOp<T>>(
      Name("TfKld>KlDivergence").Device(tensorflow::DEVICE_GPU).TypeConstraint<T>("T").Build(),
      "KlDivergenceGpuOp");
  RegisterKernelOnce<KlDivergenceGradGpuOp<T>>(
      Name("TfKld>KlDivergenceGrad").Device(tensorflow::DEVICE_GPU).TypeConstraint<T>("T").Build(),
      "KlDivergenceGradGpuOp");
}

// At load, as REGISTER_KERNEL_BUILDER would, but only where the driver can run the device code.
const bool gpu_kernels_registered = [] {
  if (!GpuGateAtLoad().register_kernels) return false;
  RegisterGpuKernels<Eigen::half>();
  RegisterGpuKernels<Eigen::bfloat16>();
  RegisterGpuKernels<float>();
  RegisterGpuKernels<double>();
  return true;
}();

}  // namespace
}  // namespace tf_kld

// For tf_kld.gpu_info() (ctypes): whether the GPU kernels are registered, and why not ("" if they are).
extern "C" __attribute__((visibility("default"))) int TfKldGpuKernelsRegistered() {
  return tf_kld::gpu_kernels_registered ? 1 : 0;
}
extern "C" __attribute__((visibility("default"))) const char* TfKldGpuGateReason() {
  return tf_kld::GpuGateAtLoad().reason.c_str();
}
extern "C" __attribute__((visibility("default"))) int TfKldNeededDriverVersion() {
  return tf_kld::gpu::NeededDriverVersion();
}
#endif  // GOOGLE_CUDA
