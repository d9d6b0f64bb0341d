// Standalone CUDA harness for tf_kld's GPU kernels (no TensorFlow): the kernel cores
// cc/kernels/kld_gpu.cu.h and cc/kernels/distill_gpu.cu.h checked against a double-precision CPU
// reference over shapes x dtypes x memory layouts (including empty, 1-wide, odd widths, 131072-wide,
// 1,000,000-row inputs, NaN and boundary values; for the distillation kernels widths 1..128256,
// temperatures 0.5/1/4, betas 0/0.1/0.5/1, -inf/huge/NaN logits), then timed: forward and
// forward+backward, in GB/s against a device-to-device copy measured in the same run.
//
//   bash tools/cuda_harness.sh                    # build with nvcc and run (see that script)
//   harness [--self-test] [--check] [--bench] [--quick] [--large] [--json FILE] [--csv FILE]
//           [--device-name NAME]   (recorded with the results; tools/cuda_harness.sh passes nvidia-smi's)
//
// --self-test needs no GPU: it checks the reference itself against known values, the Divider, the
// launch plans, and replays every check's launch on the CPU (the same SegmentSum/GradientItem code
// and the same reduction order, with the CPU's log), so the tiling is verified in CI. Without
// flags: --self-test, then --check and --bench when a GPU is present. Exit status 0 only if every
// check that ran passed.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cc/kernels/distill_gpu.cu.h"
#include "cc/kernels/kld_gpu.cu.h"

using tf_kld::gpu::Divider;
using tf_kld::gpu::ForwardPlan;
using tf_kld::gpu::Traits;

namespace {

int failures = 0;

#define CUDA_OK(expr)                                                                               \
  do {                                                                                              \
    const cudaError_t err_ = (expr);                                                                \
    if (err_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(2);                                                                                 \
    }                                                                                               \
  } while (0)

void Expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    if (failures <= 40) std::printf("FAIL: %s\n", what.c_str());
  }
}

std::string Format(const char* format, double x) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, x);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Types.

template <typename T>
struct Type;
template <>
struct Type<__half> {
  static constexpr const char* kName = "float16";
  static double ToDouble(__half x) { return __half2float(x); }
  static __half FromDouble(double x) { return __double2half(x); }
  static constexpr double kUlp = 0x1p-10, kMaxFinite = 65504.0, kRtol = 1e-5, kTiny = 0x1p-24;
};
template <>
struct Type<__nv_bfloat16> {
  static constexpr const char* kName = "bfloat16";
  static double ToDouble(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __nv_bfloat16 FromDouble(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
  static constexpr double kUlp = 0x1p-7, kMaxFinite = 3.3895313892515355e38, kRtol = 1e-5, kTiny = 1e-38;
};
template <>
struct Type<float> {
  static constexpr const char* kName = "float32";
  static double ToDouble(float x) { return x; }
  static float FromDouble(double x) { return static_cast<float>(x); }
  // The test suite's float32 tolerance: 1e-6 of |loss| + sum t_c (1 + |log(t_c / p_c)|).
  static constexpr double kUlp = 0, kMaxFinite = 3.4028234663852886e38, kRtol = 1e-6, kTiny = 1e-45;
};
template <>
struct Type<double> {
  static constexpr const char* kName = "float64";
  static double ToDouble(double x) { return x; }
  static double FromDouble(double x) { return x; }
  static constexpr double kUlp = 0, kMaxFinite = 1.7976931348623157e308, kRtol = 1e-12, kTiny = 0;
};

// The clip epsilon as the op receives it: Keras's 1e-7 rounded to the dtype.
template <typename T>
double Epsilon(double eps) {
  return Type<T>::ToDouble(Type<T>::FromDouble(eps));
}

// got (a T widened to double) against the exact ref: |got - ref| <= rtol (|ref| + scale) + the
// 16-bit rounding of ref; NaN and +-Inf must match; a ref beyond the dtype's range must be Inf.
template <typename T>
bool Close(double got, double ref, double scale, double* worst) {
  using Ty = Type<T>;
  if (std::isnan(ref)) return std::isnan(got);
  if (std::isinf(ref)) return got == ref;
  const double rounded = Ty::ToDouble(Ty::FromDouble(ref));
  if (std::isinf(rounded)) {  // beyond the dtype's range: Inf, or the largest finite value at the edge
    return got == rounded ||
           (std::fabs(ref) <= Ty::kMaxFinite * (1 + Ty::kUlp) && got == std::copysign(Ty::kMaxFinite, ref));
  }
  if (!std::isfinite(got)) return false;
  const double tol = Ty::kRtol * (std::fabs(ref) + scale) + Ty::kUlp * std::fabs(ref) + Ty::kTiny;
  const double err = std::fabs(got - ref);
  if (tol > 0) *worst = std::max(*worst, err / tol);
  return err <= tol;
}

// ---------------------------------------------------------------------------------------------
// The double-precision reference (semantics of tf_kld.reference / kld_cpu_impl.h).

double ClipD(double x, double eps) {
  const double upper = x > 1.0 ? 1.0 : x;
  return upper < eps ? eps : upper;
}
bool InsideD(double x, double eps) { return x >= eps && x <= 1.0; }

// t_c / p_c as the kernels compute it: float16/bfloat16/float32 divide in float, so a ratio beyond
// float's range is Inf (or 0) there, as on the CPU. Rounding it to float costs at most 0.5 ulp of
// log(t_c / p_c), inside every dtype's tolerance.
double Ratio(double tc, double pc, bool in_float) {
  return in_float ? static_cast<double>(static_cast<float>(tc) / static_cast<float>(pc)) : tc / pc;
}

struct RowRef {
  double loss;
  double scale;  // sum t_c (1 + |log(t_c / p_c)|): the rounding budget of a row
};

// Neumaier summation: the reference row sum is accurate to ~1 ulp however long the row.
RowRef ReferenceRow(const double* t, const double* p, int64_t n, double eps, bool in_float) {
  double sum = 0, comp = 0, scale = 0, plain = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double tc = ClipD(t[i], eps), lr = std::log(Ratio(tc, ClipD(p[i], eps), in_float));
    const double term = tc * lr;
    const double s = sum + term;
    comp += std::fabs(sum) >= std::fabs(term) ? (sum - s) + term : (term - s) + sum;
    sum = s;
    plain += term;
    if (std::isfinite(term)) scale += tc * (1 + std::fabs(lr));
  }
  return {std::isfinite(plain) ? sum + comp : plain, scale};  // Inf and NaN as a plain sum has them
}

// The gradient's reference and its rounding budget (|g| (1 + |log r|) for y_true: cancellation at
// t/p = 1/e makes a relative tolerance meaningless there).
// in_float: g * t_c in float as the kernels do (it can be subnormal when eps is).
double ReferenceGrad(double g, double t, double p, double eps, bool wrt_true, bool in_float, double* scale) {
  const double tc = ClipD(t, eps), pc = ClipD(p, eps);
  *scale = 0;
  if (wrt_true) {
    if (!InsideD(t, eps)) return 0.0;
    const double lr = std::log(Ratio(tc, pc, in_float));
    *scale = std::fabs(g) * (1 + std::fabs(lr));
    return g * (lr + 1.0);
  }
  if (!InsideD(p, eps)) return 0.0;
  return in_float ? -Ratio(static_cast<float>(g) * static_cast<float>(tc), p, true) : -(g * tc) / p;
}

// ---------------------------------------------------------------------------------------------
// Inputs.

enum class Data { kSoftmax, kUniform, kSpecial };
const char* DataName(Data d) {
  return d == Data::kSoftmax ? "softmax" : d == Data::kUniform ? "uniform" : "special";
}

template <typename T>
std::vector<double> SpecialValues(double eps) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> v = {0.0,
                           -0.0,
                           -0.5,
                           -1.0,
                           -eps,
                           eps,
                           1.0,
                           1.5,
                           2.0,
                           1e4,
                           inf,
                           -inf,
                           std::nan(""),
                           eps / 4,
                           1e-3,
                           0.5,
                           std::nextafter(1.0, 2.0),
                           std::nextafter(1.0, 0.0),
                           std::nextafter(eps, 1.0),
                           std::nextafter(eps, 0.0)};
  for (double& x : v)
    x = Type<T>::ToDouble(Type<T>::FromDouble(x));  // the nextafters round to neighbours in T
  return v;
}

template <typename T>
void Fill(std::vector<double>* t, std::vector<double>* p, int64_t rows, int64_t cols, Data data, double eps,
          uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const std::vector<double> special = SpecialValues<T>(eps);
  t->resize(rows * cols);
  p->resize(rows * cols);
  if (data == Data::kSoftmax) {
    std::vector<double> e(cols);
    for (std::vector<double>* x : {t, p}) {
      for (int64_t r = 0; r < rows; ++r) {
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += e[c] = std::exp(normal(rng));
        for (int64_t c = 0; c < cols; ++c) (*x)[r * cols + c] = e[c] / sum;
      }
    }
  } else {
    for (int64_t i = 0; i < rows * cols; ++i) {
      (*t)[i] = uniform(rng);
      (*p)[i] = uniform(rng) < 0.02 ? 0.0 : uniform(rng);
      if (data == Data::kSpecial) {
        if (uniform(rng) < 0.1) (*t)[i] = special[rng() % special.size()];
        if (uniform(rng) < 0.1) (*p)[i] = special[rng() % special.size()];
      }
    }
  }
  for (std::vector<double>* x : {t, p}) {
    for (double& v : *x) v = Type<T>::ToDouble(Type<T>::FromDouble(v));  // exactly representable in T
  }
}

// ---------------------------------------------------------------------------------------------
// Running the kernels: on the GPU, or replayed on the CPU (same per-thread code, same reduction order).

// v[l] += v[l ^ offset] for offset = n/2 .. 1: what GroupSum's shuffles compute; lane 0's result.
double Butterfly(std::vector<double> v) {
  for (size_t offset = v.size() / 2; offset > 0; offset /= 2) {
    std::vector<double> w(v.size());
    for (size_t l = 0; l < v.size(); ++l) w[l] = v[l] + v[l ^ offset];
    v.swap(w);
  }
  return v[0];
}

template <typename T, bool kFast>
void ReplayForwardImpl(const T* t, const T* p, T* loss, int64_t rows, int64_t cols, double eps,
                       const ForwardPlan& plan) {
  using C = typename Traits<T>::Compute;
  const bool vectorised = tf_kld::gpu::SameVectorOffset(p, t);
  const int64_t segments = rows * plan.splits;
  std::vector<double> partial(segments);
  std::vector<double> lane_sums(plan.group);
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t row = s / plan.splits, start = (s % plan.splits) * plan.chunk;
    const int64_t n = std::min(plan.chunk, cols - start);
    for (int l = 0; l < plan.group; ++l) {
      lane_sums[l] = tf_kld::gpu::SegmentSum<T, kFast>(t + row * cols + start, p + row * cols + start, n, l,
                                                       plan.group, vectorised, static_cast<C>(eps));
    }
    double sum;
    if (plan.group <= 32) {
      sum = Butterfly(lane_sums);
    } else {  // BlockSum: each warp, then warp 0 over the warp sums padded to 32 lanes
      std::vector<double> warp_sums(32, 0.0);
      for (int w = 0; w < plan.group / 32; ++w) {
        warp_sums[w] =
            Butterfly(std::vector<double>(lane_sums.begin() + 32 * w, lane_sums.begin() + 32 * w + 32));
      }
      sum = Butterfly(warp_sums);
    }
    if (plan.splits > 1) {
      partial[s] = sum;
    } else {
      loss[s] = Traits<T>::FromSum(sum);
    }
  }
  if (plan.splits > 1) {
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0;
      for (int64_t k = 0; k < plan.splits; ++k) sum += partial[r * plan.splits + k];
      loss[r] = Traits<T>::FromSum(sum);
    }
  }
}

// The library's launchers with fast_math chosen at run time (the library compiles only the exact ones).
template <typename T>
cudaError_t LaunchForward(cudaStream_t stream, const T* t, const T* p, T* loss, int64_t rows, int64_t cols,
                          double eps, const ForwardPlan& plan, double* scratch, bool fast_math) {
  return fast_math ? tf_kld::gpu::LaunchForward<T, true>(stream, t, p, loss, rows, cols, eps, plan, scratch)
                   : tf_kld::gpu::LaunchForward<T, false>(stream, t, p, loss, rows, cols, eps, plan, scratch);
}

template <typename T>
cudaError_t LaunchGradient(cudaStream_t stream, const T* g, const T* t, const T* p, T* out, int64_t rows,
                           int64_t cols, double eps, bool wrt_true, bool fast_math) {
  return fast_math ? tf_kld::gpu::LaunchGradient<T, true>(stream, g, t, p, out, rows, cols, eps, wrt_true)
                   : tf_kld::gpu::LaunchGradient<T, false>(stream, g, t, p, out, rows, cols, eps, wrt_true);
}

template <typename T>
void ReplayForward(const T* t, const T* p, T* loss, int64_t rows, int64_t cols, double eps, bool fast_math) {
  const ForwardPlan plan = tf_kld::gpu::PlanForward(rows, cols, sizeof(T));
  if (tf_kld::gpu::UseFastMath<T>(eps, fast_math)) {
    if constexpr (sizeof(T) == 2) ReplayForwardImpl<T, true>(t, p, loss, rows, cols, eps, plan);
  } else {
    ReplayForwardImpl<T, false>(t, p, loss, rows, cols, eps, plan);
  }
}

template <typename T, bool kFast, bool kWrtTrue>
void ReplayGradientImpl(const T* g, const T* t, const T* p, T* out, int64_t rows, int64_t cols, double eps) {
  using C = typename Traits<T>::Compute;
  const tf_kld::gpu::GradientLayout layout = tf_kld::gpu::MakeGradientLayout(t, p, out, rows, cols);
  for (int64_t w = 0; w < layout.items; ++w) {
    tf_kld::gpu::GradientItem<T, kFast, kWrtTrue>(w, g, t, p, out, layout, static_cast<C>(eps));
  }
}

template <typename T>
void ReplayGradient(const T* g, const T* t, const T* p, T* out, int64_t rows, int64_t cols, double eps,
                    bool wrt_true, bool fast_math) {
  if (rows <= 0 || cols <= 0) return;
  const bool fast = tf_kld::gpu::UseFastMath<T>(eps, fast_math);
  if constexpr (sizeof(T) == 2) {
    if (fast) {
      return wrt_true ? ReplayGradientImpl<T, true, true>(g, t, p, out, rows, cols, eps)
                      : ReplayGradientImpl<T, true, false>(g, t, p, out, rows, cols, eps);
    }
  }
  wrt_true ? ReplayGradientImpl<T, false, true>(g, t, p, out, rows, cols, eps)
           : ReplayGradientImpl<T, false, false>(g, t, p, out, rows, cols, eps);
}

// Buffers of T with room to place the data at an element offset (for misaligned layouts).
template <typename T>
struct Buffer {
  bool device = false;
  T* base = nullptr;
  int64_t size = 0;
  Buffer(bool on_device, int64_t n) : device(on_device), size(n + 16) {
    if (device) {
      CUDA_OK(cudaMalloc(&base, size * sizeof(T)));
    } else {
      base = static_cast<T*>(std::aligned_alloc(64, ((size * sizeof(T) + 63) / 64) * 64));
    }
  }
  ~Buffer() {
    if (device) {
      cudaFree(base);
    } else {
      std::free(base);
    }
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

template <typename T>
void Upload(T* dst, const std::vector<double>& src, bool device) {
  std::vector<T> host(src.size());
  for (size_t i = 0; i < src.size(); ++i) host[i] = Type<T>::FromDouble(src[i]);
  if (host.empty()) return;
  if (device) {
    CUDA_OK(cudaMemcpy(dst, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  } else {
    std::memcpy(dst, host.data(), host.size() * sizeof(T));
  }
}

template <typename T>
std::vector<double> Download(const T* src, int64_t n, bool device) {
  std::vector<T> host(n);
  if (n > 0) {
    if (device) {
      CUDA_OK(cudaMemcpy(host.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
    } else {
      std::memcpy(host.data(), src, n * sizeof(T));
    }
  }
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = Type<T>::ToDouble(host[i]);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The correctness matrix.

struct Shape {
  int64_t rows, cols;
};

// Element offsets of (y_true, y_pred) in their buffers: equal offsets vectorise (after a scalar head
// when misaligned), different ones take the scalar path.
struct Layout {
  int t_offset, p_offset;
  bool in_place;  // the gradient overwrites y_pred (or y_true), as TensorFlow may forward the buffer
  const char* name;
};

struct CaseStats {
  int64_t checked = 0;
  double worst = 0;    // largest error / tolerance
  double typical = 0;  // float32 softmax rows: largest |error| / |loss|
  double ulps = 0;     // 16-bit losses: largest |error| in ulps of the dtype
};

// The spacing of 16-bit values around x (0 for wider types).
template <typename T>
double Ulp(double x) {
  if (Type<T>::kUlp == 0 || !std::isfinite(x)) return 0;
  const int mantissa = std::is_same<T, __half>::value ? 10 : 7;
  const int min_exp = std::is_same<T, __half>::value ? -14 : -126;
  const int e = std::max(static_cast<int>(std::floor(std::log2(std::max(std::fabs(x), 1e-300)))), min_exp);
  return std::ldexp(1.0, e - mantissa);
}

// Rows to verify: all, or for huge inputs the first and last 4096 and 4096 random ones.
std::vector<int64_t> RowsToCheck(int64_t rows, uint64_t seed) {
  std::vector<int64_t> out;
  if (rows <= 300000) {
    for (int64_t r = 0; r < rows; ++r) out.push_back(r);
    return out;
  }
  std::mt19937_64 rng(seed);
  for (int64_t r = 0; r < 4096; ++r) out.push_back(r), out.push_back(rows - 1 - r);
  for (int k = 0; k < 4096; ++k) out.push_back(static_cast<int64_t>(rng() % rows));
  return out;
}

template <typename T>
void CheckCase(bool device, Shape shape, Data data, const Layout& layout, double keras_eps, bool fast_math,
               CaseStats* stats) {
  const int64_t rows = shape.rows, cols = shape.cols, n = rows * cols;
  const double eps = Epsilon<T>(keras_eps);
  // Only an eps below FLT_MIN lets a float ratio or product leave float's normal range.
  const bool in_float = !std::is_same<T, double>::value && eps < FLT_MIN;
  const uint64_t seed = 1000003u * rows + 7919u * cols + 31u * static_cast<int>(data) + layout.t_offset;
  std::vector<double> t, p;
  Fill<T>(&t, &p, rows, cols, data, eps, seed);
  std::vector<double> g(rows);
  {
    std::mt19937_64 rng(seed + 1);
    std::normal_distribution<double> normal;
    for (double& x : g) x = Type<T>::ToDouble(Type<T>::FromDouble(normal(rng)));
  }
  const std::string what = std::string(Type<T>::kName) + " " + std::to_string(rows) + "x" +
                           std::to_string(cols) + " " + DataName(data) + " " + layout.name +
                           " eps=" + Format("%g", eps) + (fast_math ? " fast-math" : "");
  Buffer<T> tb(device, n), pb(device, n), lb(device, rows), gb(device, rows), ob(device, n);
  T* td = tb.base + layout.t_offset;
  T* pd = pb.base + layout.p_offset;
  Upload(td, t, device);
  Upload(pd, p, device);
  Upload(gb.base, g, device);

  // Forward.
  if (device) {
    const ForwardPlan plan = tf_kld::gpu::PlanForward(rows, cols, sizeof(T));
    double* scratch = nullptr;
    if (plan.splits > 1) CUDA_OK(cudaMalloc(&scratch, tf_kld::gpu::ForwardScratchBytes(plan, rows)));
    CUDA_OK(LaunchForward(nullptr, td, pd, lb.base, rows, cols, eps, plan, scratch, fast_math));
    CUDA_OK(cudaDeviceSynchronize());
    cudaFree(scratch);
  } else {
    ReplayForward(td, pd, lb.base, rows, cols, eps, fast_math);
  }
  const std::vector<double> loss = Download(lb.base, rows, device);
  for (int64_t r : RowsToCheck(rows, seed)) {
    const RowRef ref = ReferenceRow(t.data() + r * cols, p.data() + r * cols, cols, eps, in_float);
    double worst = 0;
    const bool ok = Close<T>(loss[r], ref.loss, ref.scale, &worst);
    stats->worst = std::max(stats->worst, worst);
    ++stats->checked;
    if (Ulp<T>(ref.loss) > 0 && std::isfinite(loss[r])) {
      stats->ulps = std::max(stats->ulps, std::fabs(loss[r] - ref.loss) / Ulp<T>(ref.loss));
    }
    // "Typical": softmax rows whose loss is not mostly cancellation (loss >= scale / 10).
    if (data == Data::kSoftmax && std::is_same<T, float>::value && std::fabs(ref.loss) >= ref.scale / 10) {
      stats->typical = std::max(stats->typical, std::fabs(loss[r] - ref.loss) / std::fabs(ref.loss));
    }
    if (!ok) {
      char msg[256];
      std::snprintf(msg, sizeof(msg), "forward row %" PRId64 ": got %.17g, want %.17g (scale %.3g)", r,
                    loss[r], ref.loss, ref.scale);
      Expect(false, what + ": " + msg);
      break;
    }
  }

  // Gradients, w.r.t. y_pred and y_true.
  for (bool wrt_true : {false, true}) {
    T* out = ob.base + layout.p_offset;
    if (layout.in_place) {  // overwrite the input the gradient is taken of, on a copy
      out = (wrt_true ? tb.base + layout.t_offset : pb.base + layout.p_offset);
    }
    if (device) {
      CUDA_OK(LaunchGradient(nullptr, gb.base, td, pd, out, rows, cols, eps, wrt_true, fast_math));
      CUDA_OK(cudaDeviceSynchronize());
    } else {
      ReplayGradient(gb.base, td, pd, out, rows, cols, eps, wrt_true, fast_math);
    }
    const std::vector<double> got = Download(out, n, device);
    if (layout.in_place) Upload(wrt_true ? td : pd, wrt_true ? t : p, device);  // restore
    bool failed = false;
    for (int64_t r : RowsToCheck(rows, seed)) {
      for (int64_t c = 0; c < cols && !failed; ++c) {
        const int64_t i = r * cols + c;
        double scale;
        const double ref = ReferenceGrad(g[r], t[i], p[i], eps, wrt_true, in_float, &scale);
        double worst = 0;
        bool ok = Close<T>(got[i], ref, scale, &worst);
        if (ref == 0.0) ok = got[i] == 0.0;  // masked (or exactly zero): exactly zero
        stats->worst = std::max(stats->worst, worst);
        ++stats->checked;
        if (!ok) {
          char msg[256];
          std::snprintf(msg, sizeof(msg),
                        "d/d%s [%" PRId64 ",%" PRId64 "]: got %.17g, want %.17g (g %.9g t %.9g p %.9g)",
                        wrt_true ? "y_true" : "y_pred", r, c, got[i], ref, g[r], t[i], p[i]);
          Expect(false, what + ": " + msg);
          failed = true;
        }
      }
      if (failed) break;
    }
  }
}

std::vector<Shape> CheckShapes(bool quick, bool device) {
  std::vector<Shape> shapes = {{0, 7},    {5, 0},    {1, 1},    {7, 1},     {1000, 1},  {3, 3},     {33, 5},
                               {8, 10},   {5, 7},    {17, 33},  {64, 127},  {100, 128}, {9, 129},   {12, 511},
                               {10, 520}, {4, 1000}, {3, 4097}, {2, 32768}, {3, 70001}, {8, 131072}};
  if (!quick) {
    shapes.push_back({1, 131073});
    shapes.push_back({3, 1000003});
    shapes.push_back({1000000, 16});
    if (device) shapes.push_back({1000000, 3});
  }
  return shapes;
}

template <typename T>
void CheckDtype(bool device, bool quick, bool large) {
  const Layout layouts[] = {
      {0, 0, false, "aligned"}, {1, 1, false, "offset-1"}, {0, 1, false, "scalar"}, {3, 3, true, "in-place"}};
  const bool sixteen = sizeof(T) == 2;
  // fast_math (16-bit only) is not the library's default; on a GPU it is checked too, for the record.
  for (bool fast_math : {false, true}) {
    if (fast_math && !(sixteen && device)) continue;
    CaseStats stats;
    for (const Shape& shape : CheckShapes(quick, device)) {
      const bool big = shape.rows * shape.cols > 2000000;
      for (Data data : {Data::kSoftmax, Data::kUniform, Data::kSpecial}) {
        for (const Layout& layout : layouts) {
          // Big inputs: typical data aligned, special values misaligned (the head/tail paths) only.
          if (big && !(data == Data::kSoftmax && &layout == &layouts[0]) &&
              !(data == Data::kSpecial && &layout == &layouts[1])) {
            continue;
          }
          CheckCase<T>(device, shape, data, layout, 1e-7, fast_math, &stats);
        }
      }
    }
    // eps = 0 and a subnormal eps: the exact-math path for 16-bit types even with fast_math.
    for (double eps : {0.0, 1e-40}) {
      for (const Shape& shape : {Shape{9, 129}, Shape{5, 7}, Shape{2, 40000}}) {
        CheckCase<T>(device, shape, Data::kSpecial, layouts[1], eps, fast_math, &stats);
      }
    }
    if (large && device && !fast_math) {  // > 2^31 elements: 64-bit indexing (sampled rows)
      CheckCase<T>(device, {(int64_t{1} << 31) / 16 + 3, 16}, Data::kUniform, layouts[1], 1e-7, false,
                   &stats);
    }
    std::printf("  %-8s%s %9" PRId64 " values checked, worst error/tolerance %.3f", Type<T>::kName,
                fast_math ? " fast-math" : "", stats.checked, stats.worst);
    if (sixteen) std::printf(", loss error up to %.2f ulp", stats.ulps);
    if (std::is_same<T, float>::value) std::printf(", typical rows max |err|/loss %.2e", stats.typical);
    std::printf("\n");
    if (std::is_same<T, float>::value)
      Expect(stats.typical < 1e-6, "float32 typical rows within 1e-6 relative");
  }
}

void RunChecks(bool device, bool quick, bool large) {
  std::printf("%s checks against the float64 reference:\n", device ? "GPU" : "CPU replay of the kernels,");
  CheckDtype<__half>(device, quick, large);
  CheckDtype<__nv_bfloat16>(device, quick, large);
  CheckDtype<float>(device, quick, large);
  CheckDtype<double>(device, quick, large);
}

// ---------------------------------------------------------------------------------------------
// Self-test of the host-side pieces.

void SelfTest() {
  // The reference itself: the README's example, Keras's clip semantics, NaN rules.
  {
    const double t[] = {.4, .9, .2}, p[] = {.5, .8, .12};
    std::vector<double> tf(t, t + 3), pf(p, p + 3);
    for (double& x : tf) x = static_cast<float>(x);
    for (double& x : pf) x = static_cast<float>(x);
    // Exactly 0.1189124099 for these float32 inputs; float32 arithmetic (Keras, tf_kld) gives 0.11891246.
    const double loss = ReferenceRow(tf.data(), pf.data(), 3, static_cast<float>(1e-7), false).loss;
    Expect(std::fabs(loss - 0.1189124099) < 1e-10,
           "reference: KLD([.4, .9, .2], [.5, .8, .12]) = 0.1189124099");
    const double eps16 = Epsilon<__half>(1e-7);
    Expect(eps16 == 0x1p-23, "float16 eps = 1.1920929e-07");
    const double t2[] = {1, 0}, p2[] = {0, 1};
    Expect(std::fabs(ReferenceRow(t2, p2, 2, eps16, true).loss - 15.942385) < 1e-5,
           "reference: t=[1,0], p=[0,1] = 15.94");
    const double inf = std::numeric_limits<double>::infinity(), t4[] = {1, 0}, p4[] = {0, 0};
    Expect(ReferenceRow(t4, p4, 1, 0.0, true).loss == inf, "reference: eps = 0 gives Inf");
    Expect(std::isnan(ReferenceRow(t4, p4, 2, 0.0, true).loss), "reference: eps = 0, 0 * log(0 / 0) is NaN");
    const double nan = std::nan("");
    const double t3[] = {nan, .5}, p3[] = {.5, .5};
    Expect(std::isnan(ReferenceRow(t3, p3, 2, 1e-7, true).loss), "reference: NaN propagates");
    Expect(ReferenceRow(t3, p3, 0, 1e-7, true).loss == 0.0, "reference: empty row is 0");
    double scale;
    Expect(ReferenceGrad(1.0, .5, nan, 1e-7, false, false, &scale) == 0.0, "reference: no gradient at NaN");
    Expect(ReferenceGrad(1.0, .5, 1.0, 1e-7, false, false, &scale) == -0.5,
           "reference: gradient passes at p = 1");
    Expect(ReferenceGrad(1.0, .5, 1e-7, 1e-7, false, false, &scale) == -.5 / 1e-7,
           "reference: gradient passes at p = eps");
    Expect(ReferenceGrad(1.0, .5, 1.5, 1e-7, false, false, &scale) == 0.0, "reference: no gradient above 1");
    Expect(ReferenceGrad(2.0, 1.0, 1.0, 1e-7, true, false, &scale) == 2.0,
           "reference: d/dy_true = g (log(t/p) + 1)");
    Expect(ReferenceGrad(2.0, 1e-8, 1.0, 1e-7, true, false, &scale) == 0.0,
           "reference: no y_true gradient below eps");
  }
  // Divider: exact for every n, d.
  {
    std::mt19937_64 rng(42);
    auto check = [](uint64_t n, uint64_t d, const Divider& div) {
      if (div.Div(n) != n / d) {
        Expect(false, "Divider: " + std::to_string(n) + " / " + std::to_string(d));
        return false;
      }
      return true;
    };
    for (uint64_t d = 1; d <= 300; ++d) {
      const Divider div(d);
      for (uint64_t n = 0; n < 5000; ++n) {
        if (!check(n, d, div)) break;
      }
    }
    for (int k = 0; k < 200000; ++k) {
      const int bits = 1 + static_cast<int>(rng() % 64);
      uint64_t d = rng() >> (64 - bits);
      if (d == 0) d = 1;
      if (k % 7 == 0) d = uint64_t{1} << (rng() % 64);
      const Divider div(d);
      uint64_t n = rng();
      if (k % 3 == 0) n = (n / d) * d - (k % 2);  // around multiples
      if (k % 5 == 0) n = ~uint64_t{0} - (rng() % 3);
      check(n, d, div);
    }
  }
  // Launch plans: every element of every row in exactly one segment; sizes within limits.
  {
    const int64_t widths[] = {0,     1,     2,      3,      7,       8,       16,      31,   33,
                              127,   128,   129,    511,    512,     513,     1024,    1025, 4097,
                              32768, 65535, 131072, 262147, 1000000, 1000003, 16777216};
    const int64_t heights[] = {1, 2, 3, 31, 255, 256, 511, 512, 1000, 1000000};
    for (int bytes : {2, 4, 8}) {
      for (int64_t cols : widths) {
        for (int64_t rows : heights) {
          const ForwardPlan plan = tf_kld::gpu::PlanForward(rows, cols, bytes);
          const std::string s =
              "plan " + std::to_string(rows) + "x" + std::to_string(cols) + "x" + std::to_string(bytes);
          const bool pow2 = (plan.group & (plan.group - 1)) == 0;
          Expect(plan.block % 32 == 0 && plan.block <= tf_kld::gpu::kMaxBlock, s + ": block size");
          Expect((plan.group <= 32 && pow2 && plan.block % plan.group == 0) || plan.group == plan.block,
                 s + ": group");
          Expect(plan.blocks >= 1 && plan.blocks <= tf_kld::gpu::kMaxBlocks, s + ": grid");
          Expect(plan.splits == 1
                     ? plan.chunk == cols
                     : plan.chunk % tf_kld::gpu::kChunkAlign == 0 && plan.splits * plan.chunk >= cols &&
                           (plan.splits - 1) * plan.chunk < cols,
                 s + ": segments cover the row exactly");
          Expect(plan.splits == 1 || rows < tf_kld::gpu::kSplitRows, s + ": split only few rows");
          const ForwardPlan unsplit = tf_kld::gpu::PlanForward(rows, cols, bytes, false);
          Expect(unsplit.splits == 1, s + ": allow_split=false");
        }
      }
    }
  }
  std::printf("self-test (reference, Divider, launch plans): %s\n", failures ? "FAILED" : "ok");
}

// ---------------------------------------------------------------------------------------------
// Benchmark (GPU only).

struct Timer {
  void* flush = nullptr;
  size_t flush_bytes = 0;
  cudaEvent_t start, stop;
  Timer() {
    int l2 = 0;
    CUDA_OK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    flush_bytes = std::max<size_t>(2 * static_cast<size_t>(l2), 64 << 20);
    CUDA_OK(cudaMalloc(&flush, flush_bytes));
    CUDA_OK(cudaEventCreate(&start));
    CUDA_OK(cudaEventCreate(&stop));
  }
  ~Timer() {
    cudaFree(flush);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  // Median milliseconds of body(), each run starting with a cold L2 (inputs come from DRAM).
  double Median(const std::function<void()>& body, int reps) {
    std::vector<float> ms;
    for (int k = 0; k < reps + 2; ++k) {
      CUDA_OK(cudaMemsetAsync(flush, k & 0xff, flush_bytes));
      CUDA_OK(cudaEventRecord(start));
      body();
      CUDA_OK(cudaEventRecord(stop));
      CUDA_OK(cudaEventSynchronize(stop));
      float t = 0;
      CUDA_OK(cudaEventElapsedTime(&t, start, stop));
      if (k >= 2) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
};

struct BenchRow {
  std::string dtype, mode;
  Shape shape;
  double ms, gbps, copy_fraction;
};

template <typename T>
void BenchDtype(Timer* timer, const std::vector<Shape>& shapes, double copy_gbps, int reps, bool fast_math,
                std::vector<BenchRow>* rows_out) {
  for (const Shape& shape : shapes) {
    const int64_t rows = shape.rows, cols = shape.cols, n = rows * cols;
    std::vector<double> t, p;
    Fill<T>(&t, &p, std::min<int64_t>(rows, 1024), cols, Data::kSoftmax, 1e-7, 7);
    Buffer<T> tb(true, n), pb(true, n), lb(true, rows), ob(true, n);
    for (int64_t r0 = 0; r0 < rows; r0 += 1024) {  // tile the generated rows over the tensor
      const int64_t count = std::min<int64_t>(1024, rows - r0) * cols;
      Upload(tb.base + r0 * cols, std::vector<double>(t.begin(), t.begin() + count), true);
      Upload(pb.base + r0 * cols, std::vector<double>(p.begin(), p.begin() + count), true);
    }
    const double eps = Epsilon<T>(1e-7);
    const ForwardPlan plan = tf_kld::gpu::PlanForward(rows, cols, sizeof(T));
    double* scratch = nullptr;
    if (plan.splits > 1) CUDA_OK(cudaMalloc(&scratch, tf_kld::gpu::ForwardScratchBytes(plan, rows)));
    auto forward = [&] {
      CUDA_OK(LaunchForward(nullptr, tb.base, pb.base, lb.base, rows, cols, eps, plan, scratch, fast_math));
    };
    // The gradient consumes the loss as its upstream gradient, so it waits for the forward.
    auto both = [&] {
      forward();
      CUDA_OK(LaunchGradient(nullptr, lb.base, tb.base, pb.base, ob.base, rows, cols, eps, false, fast_math));
    };
    const double s = sizeof(T);
    const double fwd_bytes = 2 * n * s + rows * s, bwd_bytes = 3 * n * s + rows * s;
    const double fwd_ms = timer->Median(forward, reps);
    const double both_ms = timer->Median(both, reps);
    for (auto [base_mode, ms, bytes] :
         {std::tuple<std::string, double, double>{"fwd", fwd_ms, fwd_bytes},
          std::tuple<std::string, double, double>{"fwd+bwd", both_ms, fwd_bytes + bwd_bytes}}) {
      const std::string mode = base_mode + (fast_math ? " fast-math" : "");
      const double gbps = bytes / (ms * 1e-3) / 1e9;
      rows_out->push_back({Type<T>::kName, mode, shape, ms, gbps, gbps / copy_gbps});
      std::printf("  %-8s %-18s %9" PRId64 "x%-8" PRId64 " %10.4f ms %9.1f GB/s %6.1f%% of copy\n",
                  Type<T>::kName, mode.c_str(), rows, cols, ms, gbps, 100 * gbps / copy_gbps);
    }
    cudaFree(scratch);
  }
}

// ---------------------------------------------------------------------------------------------
// The distillation ops (cc/kernels/distill_gpu.cu.h): KL and generalized JSD of softmaxes of logits
// at a temperature, against a float64 reference; the launch's tiling and merge tree replayed on the
// CPU where there is no GPU.

namespace dg = tf_kld::gpu::distill;

// Which divergence a case checks: beta 0 is KL(p || q), beta 1 KL(q || p) (the KL kernel with the
// inputs swapped), else the JSD kernel.
struct DistillMode {
  double beta;
  bool jsd() const { return beta > 0.0 && beta < 1.0; }
  bool swapped() const { return beta == 1.0; }
};

struct DistillRef {
  double loss = 0.0;
  std::vector<double> lp, lq, lm;  // per element (finite rows)
  double kl_p = 0.0, kl_q = 0.0;   // JSD: KL(p || m), KL(q || m)
  double spread = 1.0;             // the error scale: 1 + the logits' ranges and differences + log n
};

// The row's loss in float64 from the T-rounded logits x (teacher) and y (student), the conventions
// of tf_kld.reference: NaN/+inf logits or an all -inf row give NaN, p > 0 with q = 0 gives +inf,
// masked (p = 0) classes add 0, an empty row gives 0.
DistillRef DistillReference(const double* x, const double* y, int64_t n, double temperature, double beta) {
  DistillRef r;
  if (n == 0) return r;
  const double inf = std::numeric_limits<double>::infinity();
  double ma = -inf, mb = -inf, lo_a = inf, lo_b = inf, diff = 0.0;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const double a = x[i] / temperature, b = y[i] / temperature;
    if (std::isnan(a) || std::isnan(b) || a == inf || b == inf) nan = true;
    if (a > -inf) ma = std::max(ma, a), lo_a = std::min(lo_a, a);
    if (b > -inf) mb = std::max(mb, b), lo_b = std::min(lo_b, b);
    if (a > -inf && b > -inf && std::isfinite(a - b)) diff = std::max(diff, std::fabs(a - b));
  }
  if (nan || ma == -inf || mb == -inf) {
    r.loss = std::nan("");
    return r;
  }
  r.spread = 1.0 + (ma - lo_a) + (mb - lo_b) + diff + std::log(static_cast<double>(n) + 1.0);
  double za = 0.0, zb = 0.0;
  for (int64_t i = 0; i < n; ++i) za += std::exp(x[i] / temperature - ma), zb += std::exp(y[i] / temperature - mb);
  const double log_za = std::log(za), log_zb = std::log(zb);
  r.lp.resize(n), r.lq.resize(n), r.lm.resize(n);
  const bool jsd = beta > 0.0 && beta < 1.0;
  double kl = 0.0, kl_p = 0.0, kl_q = 0.0;
  bool infinite = false;
  for (int64_t i = 0; i < n; ++i) {
    // a - max first: exact for huge logits, where a - (max + log z) would round at |a|'s scale.
    const double lp = (x[i] / temperature - ma) - log_za, lq = (y[i] / temperature - mb) - log_zb;
    r.lp[i] = lp, r.lq[i] = lq;
    const double p = std::exp(lp), q = std::exp(lq);
    if (lp > -inf && lq == -inf) infinite = true;
    if (lp > -inf && lq > -inf) kl += p * (lp - lq);
    if (jsd) {
      const double x1 = lp + std::log(beta), x2 = lq + std::log1p(-beta);
      const double hi = std::max(x1, x2), lo = std::min(x1, x2);
      r.lm[i] = hi == -inf ? -inf : hi + std::log1p(std::exp(lo - hi));
      if (lp > -inf) kl_p += p * (lp - r.lm[i]);
      if (lq > -inf) kl_q += q * (lq - r.lm[i]);
    }
  }
  r.kl_p = kl_p, r.kl_q = kl_q;
  r.loss = jsd ? beta * kl_p + (1.0 - beta) * kl_q : infinite ? inf : kl;
  return r;
}

// Logits of one row: kind picks the special values (kind 0: plain).
void DistillFillRow(std::mt19937_64* rng, int64_t cols, int kind, double* x, double* y) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const double inf = std::numeric_limits<double>::infinity();
  const double scale = kind == 7 ? 30.0 : 3.0, offset = kind == 1 ? 1e4 : 0.0;
  for (int64_t i = 0; i < cols; ++i) {
    x[i] = offset + scale * normal(*rng);
    y[i] = x[i] + normal(*rng);
  }
  if (cols == 0) return;
  const int64_t j = static_cast<int64_t>((*rng)() % static_cast<uint64_t>(cols));
  switch (kind) {
    case 2:  // masked teacher classes (p = 0), some masked in the student too
      for (int64_t i = 0; i < cols; i += 3) {
        x[i] = -inf;
        if (i % 2 == 0) y[i] = -inf;
      }
      if (cols > 1) x[1] = 2.0;  // never all masked
      break;
    case 3: y[j] = -inf; break;             // q = 0 where p > 0: +inf
    case 4: (j % 2 ? x : y)[j] = std::nan(""); break;
    case 5: for (int64_t i = 0; i < cols; ++i) x[i] = -inf; break;  // all -inf: NaN
    case 6: y[j] = inf; break;
    default: break;
  }
}

template <typename T>
struct DistillCase {
  int64_t rows, cols;
  double temperature;
  DistillMode mode;
  bool special;
};

// Replays LaunchForward's tiling on the CPU: the same per-lane loops, merge trees and summation order.
template <typename T>
void DistillReplayForward(const dg::Params& params, const T* t, const T* p, T* loss, double* stats, int64_t rows,
                          int64_t cols) {
  const int width = params.jsd ? dg::kJsdStats : dg::kStats;
  if (cols == 0) {
    for (int64_t r = 0; r < rows; ++r) loss[r] = Traits<T>::FromSum(0.0);
    for (int64_t i = 0; i < rows * width; ++i) stats[i] = 0.0;
    return;
  }
  const dg::Plan plan = dg::PlanRows(rows, cols);
  const int lanes = plan.group;
  auto butterfly = [](std::vector<dg::State>* s, int width_) {
    for (int offset = 1; offset < width_; offset *= 2) {
      std::vector<dg::State> next(s->size());
      for (size_t l = 0; l < s->size(); ++l) {
        const size_t o = l ^ static_cast<size_t>(offset);
        next[l] = (l & offset) ? dg::Merge((*s)[o], (*s)[l]) : dg::Merge((*s)[l], (*s)[o]);
      }
      *s = next;
    }
  };
  auto butterfly_sum = [](std::vector<double>* s, int width_) {
    for (int offset = 1; offset < width_; offset *= 2) {
      std::vector<double> next(s->size());
      for (size_t l = 0; l < s->size(); ++l) {
        const size_t o = l ^ static_cast<size_t>(offset);
        next[l] = (l & offset) ? (*s)[o] + (*s)[l] : (*s)[l] + (*s)[o];
      }
      *s = next;
    }
  };
  // A group's lanes reduced as the kernel does: one butterfly (<= 32 lanes) or warps then warp 0.
  auto reduce_states = [&](std::vector<dg::State> s) {
    if (lanes <= 32) {
      butterfly(&s, lanes);
      return s[0];
    }
    std::vector<dg::State> warps(32);
    for (int w = 0; w < lanes / 32; ++w) {
      std::vector<dg::State> warp(s.begin() + 32 * w, s.begin() + 32 * (w + 1));
      butterfly(&warp, 32);
      warps[w] = warp[0];
    }
    butterfly(&warps, 32);
    return warps[0];
  };
  auto reduce_sums = [&](std::vector<double> s) {
    if (lanes <= 32) {
      butterfly_sum(&s, lanes);
      return s[0];
    }
    std::vector<double> warps(32, 0.0);
    for (int w = 0; w < lanes / 32; ++w) {
      std::vector<double> warp(s.begin() + 32 * w, s.begin() + 32 * (w + 1));
      butterfly_sum(&warp, 32);
      warps[w] = warp[0];
    }
    butterfly_sum(&warps, 32);
    return warps[0];
  };
  for (int64_t row = 0; row < rows; ++row) {
    const T* tr = t + row * cols;
    const T* pr = p + row * cols;
    std::vector<dg::State> states(lanes);
    for (int l = 0; l < lanes; ++l) states[l] = dg::RowLane(tr, pr, cols, l, lanes, params).ToState();
    double st[dg::kJsdStats];
    double result = dg::Finish(reduce_states(states), st);
    if (params.jsd) {
      constexpr int kSums = tf_kld::distill::kJsdSums;
      std::vector<double> lane_sums(lanes * kSums, 0.0);
      for (int l = 0; l < lanes; ++l) dg::RowJsdSums(tr, pr, cols, l, lanes, params, st, &lane_sums[l * kSums]);
      double js[kSums];
      for (int k = 0; k < kSums; ++k) {
        std::vector<double> v(lanes);
        for (int l = 0; l < lanes; ++l) v[l] = lane_sums[l * kSums + k];
        js[k] = reduce_sums(v);
      }
      result = tf_kld::distill::FinishJsd(js, st);
    } else {
      st[4] = result;
    }
    loss[row] = Traits<T>::FromSum(result);
    for (int j = 0; j < width; ++j) stats[row * width + j] = st[j];
  }
}

template <typename T>
void DistillReplayGradient(const dg::Params& params, const T* g, const T* t, const T* p, const double* stats,
                           T* d_true, T* d_pred, int64_t rows, int64_t cols) {
  using C = typename Traits<T>::Compute;
  const int width = params.jsd ? dg::kJsdStats : dg::kStats;
  for (int64_t i = 0; i < rows * cols; ++i) {
    const int64_t row = i / cols;
    const C g_over_t = Traits<T>::ToCompute(g[row]) / static_cast<C>(params.temperature);
    dg::GradientElement<T>(params, g_over_t, stats + row * width, t[i], p[i], d_true ? d_true + i : nullptr,
                           d_pred ? d_pred + i : nullptr);
  }
}

// |got - ref| within the compute type's error times the row's spread, plus T's rounding of ref.
template <typename T>
bool DistillClose(double got, double ref, double error_scale, double* worst) {
  using Ty = Type<T>;
  if (std::isnan(ref)) return std::isnan(got);
  if (std::isinf(ref)) return got == ref;
  if (!std::isfinite(got)) return false;
  const double u = std::is_same<T, double>::value ? 0x1p-53 : 0x1p-24;
  // Results below FLT_MIN (float compute) carry an absolute error of a few subnormal steps.
  const double tiny = std::is_same<T, double>::value ? 1e-300 : 1e-36;
  const double tol = 64 * u * error_scale + Ty::kUlp * std::fabs(ref) + std::max(tiny, Ty::kTiny);
  const double err = std::fabs(got - ref);
  *worst = std::max(*worst, err / tol);
  return err <= tol;
}

template <typename T>
void DistillCheckCase(bool device, const DistillCase<T>& c, uint64_t seed, double* worst) {
  const int64_t rows = c.rows, cols = c.cols, n = rows * cols;
  std::mt19937_64 rng(seed);
  std::vector<double> x(n), y(n), g(rows);
  for (int64_t r = 0; r < rows; ++r) {
    DistillFillRow(&rng, cols, c.special ? static_cast<int>(r % 8) : 0, x.data() + r * cols, y.data() + r * cols);
    g[r] = 0.5 + 0.25 * static_cast<double>(r % 5);
  }
  // The T-rounded values, as the kernels see them; beta 1 swaps the inputs.
  auto round = [](std::vector<double>* v) {
    for (double& e : *v) e = Type<T>::ToDouble(Type<T>::FromDouble(e));
  };
  round(&x), round(&y), round(&g);
  if (c.mode.swapped()) std::swap(x, y);
  const dg::Params params =
      c.mode.jsd() ? dg::JsdParams(c.temperature, c.mode.beta) : dg::KlParams(c.temperature);
  const int width = params.jsd ? dg::kJsdStats : dg::kStats;
  Buffer<T> tb(device, n), pb(device, n), gb(device, rows), lb(device, rows), dtb(device, n), dpb(device, n);
  Buffer<double> sb(device, rows * width);
  Upload(tb.base, x, device), Upload(pb.base, y, device), Upload(gb.base, g, device);
  if (device) {
    CUDA_OK(dg::LaunchForward(nullptr, params, tb.base, pb.base, lb.base, sb.base, rows, cols));
    CUDA_OK(dg::LaunchGradient(nullptr, params, gb.base, tb.base, pb.base, sb.base, dtb.base, dpb.base, rows, cols));
    CUDA_OK(cudaDeviceSynchronize());
  } else {
    DistillReplayForward(params, tb.base, pb.base, lb.base, sb.base, rows, cols);
    DistillReplayGradient(params, gb.base, tb.base, pb.base, sb.base, dtb.base, dpb.base, rows, cols);
  }
  const std::vector<double> loss = Download(lb.base, rows, device);
  const std::vector<double> d_true = Download(dtb.base, n, device), d_pred = Download(dpb.base, n, device);
  const std::string name = std::string(Type<T>::kName) + " " + std::to_string(rows) + "x" + std::to_string(cols) +
                           " T=" + Format("%g", c.temperature) + " beta=" + Format("%g", c.mode.beta) +
                           (c.special ? " special" : "");
  int bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const DistillRef ref = DistillReference(x.data() + r * cols, y.data() + r * cols, cols, c.temperature, c.mode.beta);
    if (!DistillClose<T>(loss[r], ref.loss, ref.spread * (1.0 + std::fabs(ref.loss)), worst) && bad++ < 3) {
      Expect(false, name + ": loss of row " + std::to_string(r) + " = " + Format("%.9g", loss[r]) + ", reference " +
                        Format("%.9g", ref.loss));
    }
    if (!std::isfinite(ref.loss) || cols == 0) continue;  // gradients of finite rows only
    const double gt = g[r] / c.temperature, beta = c.mode.beta;
    auto times = [](double w, double x) { return w == 0.0 ? 0.0 : w * std::fabs(x); };  // 0 at masked classes
    for (int64_t j = 0; j < cols; ++j) {
      const double lp = ref.lp[j], lq = ref.lq[j], p = std::exp(lp), q = std::exp(lq);
      double rt, rp, scale;
      if (!c.mode.jsd()) {
        rp = gt * (q - p);
        rt = p == 0.0 ? 0.0 : gt * p * ((lp - lq) - ref.loss);
        scale = std::fabs(gt) * ref.spread * (p + q + times(p, lp - lq) + p * std::fabs(ref.loss));
      } else {
        const double lm = ref.lm[j];
        rt = p == 0.0 ? 0.0 : gt * beta * p * ((lp - lm) - ref.kl_p);
        rp = q == 0.0 ? 0.0 : gt * (1.0 - beta) * q * ((lq - lm) - ref.kl_q);
        scale = std::fabs(gt) * ref.spread *
                (p * (1.0 + ref.kl_p) + times(p, lp - lm) + q * (1.0 + ref.kl_q) + times(q, lq - lm));
      }
      const int64_t i = r * cols + j;
      if (!DistillClose<T>(d_true[i], rt, scale, worst) && bad++ < 3) {
        Expect(false, name + ": d_true[" + std::to_string(r) + "," + std::to_string(j) +
                          "] = " + Format("%.9g", d_true[i]) + ", reference " + Format("%.9g", rt));
      }
      if (!DistillClose<T>(d_pred[i], rp, scale, worst) && bad++ < 3) {
        Expect(false, name + ": d_pred[" + std::to_string(r) + "," + std::to_string(j) +
                          "] = " + Format("%.9g", d_pred[i]) + ", reference " + Format("%.9g", rp));
      }
    }
  }
  if (bad > 3) Expect(false, name + ": " + std::to_string(bad) + " values out of tolerance in all");
}

template <typename T>
void DistillCheckDtype(bool device, bool quick) {
  const int failures_before = failures;
  double worst = 0.0;
  int cases = 0;
  const std::vector<std::pair<int64_t, int64_t>> shapes =
      quick ? std::vector<std::pair<int64_t, int64_t>>{{9, 1}, {37, 33}, {5, 1000}, {2, 32000}}
            : std::vector<std::pair<int64_t, int64_t>>{{3, 0},  {9, 1},    {41, 7},   {37, 33},
                                                       {16, 1000}, {8, 32000}, {2, 128256}};
  uint64_t seed = 1;
  for (const auto& [rows, cols] : shapes) {
    for (double temperature : {0.5, 1.0, 4.0}) {
      for (double beta : {0.0, 0.1, 0.5, 1.0}) {
        for (bool special : {false, true}) {
          DistillCheckCase<T>(device, {rows, cols, temperature, {beta}, special}, seed++, &worst);
          ++cases;
        }
      }
    }
  }
  std::printf("  distill %-8s %3d cases, worst error %.3f of tolerance: %s\n", Type<T>::kName, cases, worst,
              failures == failures_before ? "ok" : "FAILED");
}

void DistillRunChecks(bool device, bool quick) {
  std::printf("distillation kernels, %s against the float64 reference:\n", device ? "GPU" : "CPU replay");
  DistillCheckDtype<__half>(device, quick);
  DistillCheckDtype<__nv_bfloat16>(device, quick);
  DistillCheckDtype<float>(device, quick);
  DistillCheckDtype<double>(device, quick);
}

// The reference itself on known values, and the row plans.
void DistillSelfTest() {
  const double inf = std::numeric_limits<double>::infinity();
  {
    const double x[] = {0.0, std::log(3.0)}, y[] = {0.0, 0.0};  // p = [1/4, 3/4], q = [1/2, 1/2]
    const double kl = 0.25 * std::log(0.5) + 0.75 * std::log(1.5);
    Expect(std::fabs(DistillReference(x, y, 2, 1.0, 0.0).loss - kl) < 1e-15, "distill reference: KL");
    const double m0 = 0.375, m1 = 0.625;
    const double jsd = 0.5 * (0.25 * std::log(0.25 / m0) + 0.75 * std::log(0.75 / m1)) +
                       0.5 * (0.5 * std::log(0.5 / m0) + 0.5 * std::log(0.5 / m1));
    Expect(std::fabs(DistillReference(x, y, 2, 1.0, 0.5).loss - jsd) < 1e-15, "distill reference: JSD");
    const double xm[] = {-inf, 1.0}, ym[] = {-inf, 5.0};
    Expect(DistillReference(xm, ym, 2, 1.0, 0.0).loss == 0.0, "distill reference: masked class adds 0");
    const double yq[] = {0.0, -inf};
    Expect(DistillReference(x, yq, 2, 1.0, 0.0).loss == inf, "distill reference: q = 0 < p gives inf");
    const double xa[] = {-inf, -inf};
    Expect(std::isnan(DistillReference(xa, y, 2, 1.0, 0.0).loss), "distill reference: all -inf is NaN");
    Expect(DistillReference(x, y, 0, 1.0, 0.0).loss == 0.0, "distill reference: empty row is 0");
  }
  for (int64_t cols : {int64_t{1}, int64_t{7}, int64_t{33}, int64_t{1024}, int64_t{1025}, int64_t{32000},
                       int64_t{262144}}) {
    for (int64_t rows : {int64_t{1}, int64_t{255}, int64_t{100000000}}) {
      const dg::Plan plan = dg::PlanRows(rows, cols);
      const std::string s = "distill plan " + std::to_string(rows) + "x" + std::to_string(cols);
      Expect(plan.block % 32 == 0 && plan.block <= tf_kld::gpu::kMaxBlock, s + ": block size");
      Expect((plan.group <= 32 && (plan.group & (plan.group - 1)) == 0 && plan.block % plan.group == 0) ||
                 plan.group == plan.block,
             s + ": group");
      Expect(plan.blocks >= 1 && plan.blocks <= tf_kld::gpu::kMaxBlocks, s + ": grid");
    }
  }
  std::printf("distill self-test (reference, plans): %s\n", failures ? "FAILED" : "ok");
}

// Forward and forward+backward (student gradient only, as in distillation) of both kernels.
template <typename T>
void DistillBenchDtype(Timer* timer, const std::vector<Shape>& shapes, double copy_gbps, int reps,
                       std::vector<BenchRow>* rows_out) {
  for (const Shape& shape : shapes) {
    const int64_t rows = shape.rows, cols = shape.cols, n = rows * cols;
    const int64_t fill_rows = std::min<int64_t>(rows, 64);
    std::vector<double> x(fill_rows * cols), y(fill_rows * cols);
    std::mt19937_64 rng(7);
    for (int64_t r = 0; r < fill_rows; ++r) DistillFillRow(&rng, cols, 0, x.data() + r * cols, y.data() + r * cols);
    Buffer<T> tb(true, n), pb(true, n), lb(true, rows), ob(true, n);
    Buffer<double> sb(true, rows * dg::kJsdStats);
    for (int64_t r0 = 0; r0 < rows; r0 += fill_rows) {  // tile the generated rows over the tensor
      const int64_t count = std::min<int64_t>(fill_rows, rows - r0) * cols;
      Upload(tb.base + r0 * cols, std::vector<double>(x.begin(), x.begin() + count), true);
      Upload(pb.base + r0 * cols, std::vector<double>(y.begin(), y.begin() + count), true);
    }
    for (bool jsd : {false, true}) {
      const dg::Params params = jsd ? dg::JsdParams(2.0, 0.5) : dg::KlParams(2.0);
      auto forward = [&] { CUDA_OK(dg::LaunchForward(nullptr, params, tb.base, pb.base, lb.base, sb.base, rows, cols)); };
      auto both = [&] {
        forward();
        CUDA_OK(dg::LaunchGradient(nullptr, params, lb.base, tb.base, pb.base, sb.base, static_cast<T*>(nullptr),
                                   ob.base, rows, cols));
      };
      const double s = sizeof(T);
      const double fwd_bytes = 2 * n * s + rows * s, bwd_bytes = 3 * n * s + rows * s;
      const std::string kind = jsd ? "jsd" : "kl_logits";
      for (auto [mode, ms, bytes] :
           {std::tuple<std::string, double, double>{kind + " fwd", timer->Median(forward, reps), fwd_bytes},
            std::tuple<std::string, double, double>{kind + " fwd+bwd", timer->Median(both, reps),
                                                    fwd_bytes + bwd_bytes}}) {
        const double gbps = bytes / (ms * 1e-3) / 1e9;
        rows_out->push_back({Type<T>::kName, mode, shape, ms, gbps, gbps / copy_gbps});
        std::printf("  %-8s %-18s %9" PRId64 "x%-8" PRId64 " %10.4f ms %9.1f GB/s %6.1f%% of copy\n", Type<T>::kName,
                    mode.c_str(), rows, cols, ms, gbps, 100 * gbps / copy_gbps);
      }
    }
  }
}

// What the benchmark records about device 0. cudaDeviceGetAttribute, not cudaGetDeviceProperties:
// the variant linked against TensorFlow's libcudart.so.12 would bind the latter to CUDA 12's
// cudaDeviceProp (1008 bytes) while this file is compiled with CUDA 13's (1032, other offsets).
struct DeviceInfo {
  std::string name = "GPU 0";  // --device-name (the runtime API has no attribute for it)
  int major = 0, minor = 0, multiProcessorCount = 0;
};
std::string device_name;

DeviceInfo QueryDevice() {
  DeviceInfo info;
  if (!device_name.empty()) info.name = device_name;
  CUDA_OK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, 0));
  CUDA_OK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, 0));
  CUDA_OK(cudaDeviceGetAttribute(&info.multiProcessorCount, cudaDevAttrMultiProcessorCount, 0));
  return info;
}

void Bench(bool quick, const std::string& json_path, const std::string& csv_path) {
  const DeviceInfo prop = QueryDevice();
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  Timer timer;
  const int reps = quick ? 5 : 21;
  // Device-to-device copy of 1 GiB (read + write), the bandwidth to compare with.
  const size_t copy_bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  CUDA_OK(cudaMalloc(&a, copy_bytes));
  CUDA_OK(cudaMalloc(&b, copy_bytes));
  CUDA_OK(cudaMemset(a, 1, copy_bytes));
  const double copy_ms =
      timer.Median([&] { CUDA_OK(cudaMemcpyAsync(b, a, copy_bytes, cudaMemcpyDeviceToDevice)); }, reps);
  cudaFree(a);
  cudaFree(b);
  const double copy_gbps = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  std::printf("bench on %s (sm_%d%d, %d SMs, driver %d, runtime %d): device-to-device copy %.1f GB/s\n",
              prop.name.c_str(), prop.major, prop.minor, prop.multiProcessorCount, driver, runtime,
              copy_gbps);
  std::vector<Shape> shapes = {{4096, 4096}, {1000000, 16}, {32, 131072}, {64, 1000000}, {8, 10}};
  if (quick) shapes = {{4096, 4096}, {1000000, 16}, {8, 10}};
  std::vector<BenchRow> rows;
  BenchDtype<float>(&timer, shapes, copy_gbps, reps, false, &rows);
  BenchDtype<__half>(&timer, shapes, copy_gbps, reps, false, &rows);
  BenchDtype<__nv_bfloat16>(&timer, shapes, copy_gbps, reps, false, &rows);
  BenchDtype<double>(&timer, shapes, copy_gbps, reps, false, &rows);
  // Not the library's default (see kld_gpu.cu.h): measured so the choice can be revisited with data.
  BenchDtype<__half>(&timer, shapes, copy_gbps, reps, true, &rows);
  BenchDtype<__nv_bfloat16>(&timer, shapes, copy_gbps, reps, true, &rows);
  // The distillation kernels at issue #12's shapes (T = 2, JSD beta = 0.5).
  std::vector<Shape> distill_shapes = {{8192, 32000}, {1024, 128256}, {256, 262144}, {65536, 10}};
  if (quick) distill_shapes = {{1024, 128256}, {65536, 10}};
  DistillBenchDtype<float>(&timer, distill_shapes, copy_gbps, reps, &rows);
  DistillBenchDtype<__nv_bfloat16>(&timer, distill_shapes, copy_gbps, reps, &rows);
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f == nullptr) {
      std::perror(json_path.c_str());
      return;
    }
    std::fprintf(f, "{\n  \"device\": \"%s\", \"compute_capability\": \"%d.%d\", \"sms\": %d,\n",
                 prop.name.c_str(), prop.major, prop.minor, prop.multiProcessorCount);
    std::fprintf(f, "  \"driver\": %d, \"runtime\": %d, \"copy_gbps\": %.2f,\n  \"results\": [\n", driver,
                 runtime, copy_gbps);
    for (size_t i = 0; i < rows.size(); ++i) {
      const BenchRow& r = rows[i];
      std::fprintf(f,
                   "    {\"dtype\": \"%s\", \"mode\": \"%s\", \"rows\": %" PRId64 ", \"cols\": %" PRId64
                   ", \"ms\": %.6f, \"gbps\": %.2f, \"fraction_of_copy\": %.4f}%s\n",
                   r.dtype.c_str(), r.mode.c_str(), r.shape.rows, r.shape.cols, r.ms, r.gbps, r.copy_fraction,
                   i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
    std::printf("wrote %s\n", json_path.c_str());
  }
  if (!csv_path.empty()) {
    FILE* f = std::fopen(csv_path.c_str(), "w");
    if (f != nullptr) {
      std::fprintf(f, "device,dtype,mode,rows,cols,ms,gbps,copy_gbps,fraction_of_copy\n");
      for (const BenchRow& r : rows) {
        std::fprintf(f, "\"%s\",%s,%s,%" PRId64 ",%" PRId64 ",%.6f,%.2f,%.2f,%.4f\n", prop.name.c_str(),
                     r.dtype.c_str(), r.mode.c_str(), r.shape.rows, r.shape.cols, r.ms, r.gbps, copy_gbps,
                     r.copy_fraction);
      }
      std::fclose(f);
      std::printf("wrote %s\n", csv_path.c_str());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool self_test = false, check = false, bench = false, quick = false, large = false;
  std::string json, csv;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--self-test") {
      self_test = true;
    } else if (a == "--check") {
      check = true;
    } else if (a == "--bench") {
      bench = true;
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--large") {
      large = true;
    } else if (a == "--json" && i + 1 < argc) {
      json = argv[++i];
    } else if (a == "--csv" && i + 1 < argc) {
      csv = argv[++i];
    } else if (a == "--device-name" && i + 1 < argc) {
      device_name = argv[++i];
    } else {
      std::fprintf(
          stderr,
          "usage: %s [--self-test] [--check] [--bench] [--quick] [--large] [--json FILE] [--csv FILE]\n"
          "          [--device-name NAME]\n",
          argv[0]);
      return 2;
    }
  }
  int devices = 0;
  const cudaError_t probe = cudaGetDeviceCount(&devices);
  const bool gpu = probe == cudaSuccess && devices > 0;
  if (!self_test && !check && !bench) {
    self_test = true, check = bench = gpu;
    if (!gpu) {
      std::printf("no GPU (%s): only the checks that need none\n",
                  probe == cudaSuccess ? "no devices" : cudaGetErrorString(probe));
    }
  }
  if (self_test) {
    SelfTest();
    RunChecks(/*device=*/false, quick, false);
    DistillSelfTest();
    DistillRunChecks(/*device=*/false, quick);
  }
  if ((check || bench) && !gpu) {
    std::printf("no GPU (%s): GPU checks and benchmark skipped\n",
                probe == cudaSuccess ? "no devices" : cudaGetErrorString(probe));
    return failures ? 1 : (check || bench) ? 3 : 0;
  }
  if (check) {
    RunChecks(/*device=*/true, quick, large);
    DistillRunChecks(/*device=*/true, quick);
  }
  if (bench && failures == 0) Bench(quick, json, csv);
  std::printf("%s\n", failures ? "FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
