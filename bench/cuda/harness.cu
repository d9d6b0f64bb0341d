// Standalone CUDA harness for tf_kld's GPU kernels (no TensorFlow): the kernel core
// cc/kernels/kld_gpu.cu.h checked against a double-precision CPU reference over shapes x dtypes x
// memory layouts (including empty, 1-wide, odd widths, 131072-wide, 1,000,000-row inputs, NaN and
// boundary values), then timed: forward and forward+backward, in GB/s against a device-to-device
// copy measured in the same run.
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
  }
  if ((check || bench) && !gpu) {
    std::printf("no GPU (%s): GPU checks and benchmark skipped\n",
                probe == cudaSuccess ? "no devices" : cudaGetErrorString(probe));
    return failures ? 1 : (check || bench) ? 3 : 0;
  }
  if (check) RunChecks(/*device=*/true, quick, large);
  if (bench && failures == 0) Bench(quick, json, csv);
  std::printf("%s\n", failures ? "FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
