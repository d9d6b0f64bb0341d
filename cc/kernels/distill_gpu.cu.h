// The CUDA kernel core of the distillation ops (TfKld>KlDivergenceWithLogits, TfKld>GeneralizedJsd-
// WithLogits and their gradients). No TensorFlow: distill_kernels.cu.cc (the TensorFlow glue) and
// the standalone harness bench/cuda/harness.cu both include it, nvcc only. The per-thread work
// (Step, Merge, JsdTerms, the gradient element) is __host__ __device__ so the harness replays a
// launch's tiling and reduction tree on the CPU where there is no GPU.
//
// Semantics and statistics are the CPU core's (distill_cpu.h): a = y_true / T, b = y_pred / T in the
// compute type (float for float16/bfloat16/float32, double for float64); per row the online state
// max_a, sum_a = sum exp(a - max_a), cross = sum exp(a - max_a) (a - b), max_b, sum_b, rescaled when
// a maximum grows; exps in the compute type, the three sums in it for 8 steps, then in double. NaN and +inf logits make a
// sum NaN (no test needed), masked classes (-inf) add nothing and never 0 * inf. As there, float
// compute takes the maxima of the raw logits and divides the distances to them by T (Units), and
// the stats hold max / T in double.
//
// Launch shapes depend on the tensor shape only, and every reduction has a fixed tree (no atomics),
// so results are deterministic. Rows of at most kWarpRowCols classes: 1..32 lanes of a warp per row
// (256-thread blocks); wider rows: one block per row (128..512 threads). JSD's second pass rereads the
// row (from L2 for the vocabularies of language models).
#ifndef TF_KLD_CC_KERNELS_DISTILL_GPU_CU_H_
#define TF_KLD_CC_KERNELS_DISTILL_GPU_CU_H_

#include <type_traits>

#include "cc/kernels/distill_jsd.h"
#include "cc/kernels/kld_gpu.cu.h"

namespace tf_kld {
namespace gpu {
namespace distill {

constexpr int kStats = 5;     // [max_a, log sum_a, max_b, log sum_b, KL]; distill_cpu.h's kStats
constexpr int kJsdStats = 6;  // [max_a, log sum_a, max_b, log sum_b, KL(p || m), KL(q || m)]
constexpr int64_t kWarpRowCols = 1024;
constexpr int kRowBlock = 256;  // threads per block of the narrow-row path and of the gradient

// What a launch computes: KL (jsd false) or the generalized JSD with 0 < beta < 1.
struct Params {
  double temperature = 1.0;
  bool jsd = false;
  double beta = 0.5, log_beta = 0.0, log1m_beta = 0.0;  // log(beta), log1p(-beta)
  double ratio_threshold = 0.0;                         // tf_kld::distill::RatioThreshold(beta)
  double series[tf_kld::distill::kJsdSeries] = {};      // tf_kld::distill::JsdSeries(beta)
};

inline Params KlParams(double temperature) {
  Params p;
  p.temperature = temperature;
  return p;
}

inline Params JsdParams(double temperature, double beta) {
  Params p;
  p.temperature = temperature;
  p.jsd = true;
  p.beta = beta;
  p.log_beta = std::log(beta);
  p.log1m_beta = std::log1p(-beta);
  p.ratio_threshold = tf_kld::distill::RatioThreshold(beta);
  tf_kld::distill::JsdSeries(beta, p.series);
  return p;
}

// exp, expm1, log, log1p in the compute type: CUDA's float (fn##f) and double functions on the
// device, the host's for the replay.
#ifdef __CUDA_ARCH__
#define TF_KLD_DISTILL_MATH(Name, fn)                \
  TF_KLD_HD float Name(float x) { return fn##f(x); } \
  TF_KLD_HD double Name(double x) { return fn(x); }
#else
#define TF_KLD_DISTILL_MATH(Name, fn)                    \
  TF_KLD_HD float Name(float x) { return std::fn(x); }   \
  TF_KLD_HD double Name(double x) { return std::fn(x); }
#endif
TF_KLD_DISTILL_MATH(Exp, exp)
TF_KLD_DISTILL_MATH(Expm1, expm1)
TF_KLD_DISTILL_MATH(Log, log)
TF_KLD_DISTILL_MATH(Log1p, log1p)
#undef TF_KLD_DISTILL_MATH
TF_KLD_HD bool IsNan(double x) { return x != x; }

// How logits enter the arithmetic, as the CPU core's: float compute keeps them raw, takes the maxima
// of the raw logits and divides the distances to them by T ((x - max) / T: exact where it counts);
// its stats hold max / T in double, from which the float maximum comes back exactly (within two
// double ulps of a float). double compute divides each logit by T first, its stats the maxima of
// x / T.
template <typename C>
struct Units {
  static constexpr bool kRaw = !std::is_same<C, double>::value;
  C temperature = C(1);
  bool scaled = false;

  Units() = default;
  TF_KLD_HD explicit Units(double t) : temperature(static_cast<C>(t)), scaled(static_cast<C>(t) != C(1)) {}
  template <typename T>
  TF_KLD_HD C In(T x) const {
    const C v = Traits<T>::ToCompute(x);
    return !kRaw && scaled ? v / temperature : v;
  }
  // A distance of In() values in units of x / T.
  TF_KLD_HD C OverT(C d) const { return kRaw && scaled ? d / temperature : d; }
  // The same in double, for a distance of the maxima taken exactly in double.
  TF_KLD_HD double OverTD(double d) const { return kRaw && scaled ? d / static_cast<double>(temperature) : d; }
  TF_KLD_HD double Stat(C max) const {
    return kRaw ? static_cast<double>(max) / static_cast<double>(temperature) : static_cast<double>(max);
  }
  TF_KLD_HD C Max(double stat) const {
    return static_cast<C>(kRaw ? stat * static_cast<double>(temperature) : stat);
  }
};

// The merged state of a row piece (maxima widened to double), as distill::KlPartial.
struct State {
  double max_a = -INFINITY, sum_a = 0.0, cross = 0.0, max_b = -INFINITY, sum_b = 0.0;
  int infinite = 0;  // a class with p > 0 and q = 0: the row's KL is +inf
};

// One thread's running state; maxima in the compute type C. The sums run in C for kFlushSteps
// steps (a few ulps of C), then go into double, as the CPU core's lanes: a double add per element
// would make the kernel compute-bound on GPUs with slow double arithmetic.
constexpr int kFlushSteps = 8;

template <typename C>
struct Lane {
  Units<C> u;
  C max_a = -INFINITY, max_b = -INFINITY;
  C fsum_a = 0, fcross = 0, fsum_b = 0;
  double sum_a = 0.0, cross = 0.0, sum_b = 0.0;
  int steps = 0;
  int infinite = 0;

  // One element of each row, as Units::In gives them.
  TF_KLD_HD void Step(C a, C b) {
    const bool masked_a = a == C(-INFINITY), masked_b = b == C(-INFINITY);
    if (masked_b && !masked_a) infinite = 1;
    if (a > max_a || b > max_b) {
      // The partials into double first: the sums move to the new maxima by factors taken in double
      // from the maxima's exact differences, as the CPU core's (KlLanes::Raise). A factor in C put
      // up to an ulp of C of the whole sum so far into every move, independently for the two sums,
      // so into their log-sums' difference.
      Flush();
      const double old_a = max_a, old_b = max_b;
      const double new_a = a > max_a ? a : max_a, new_b = b > max_b ? b : max_b;
      Rebase(u.OverTD((old_a - new_a) - (old_b - new_b)));
      if (a > max_a) {  // exp(-inf) = 0 for the first element; +inf makes exp(inf - inf) = NaN below
        const double s = Exp(u.OverTD(old_a - new_a));
        sum_a *= s, cross *= s;
        max_a = a;
      }
      if (b > max_b) {
        sum_b *= Exp(u.OverTD(old_b - new_b));
        max_b = b;
      }
    }
    const C da = u.OverT(a - max_a), db = u.OverT(b - max_b);
    const C ea = masked_a ? C(0) : Exp(da);
    fsum_a += ea;
    fsum_b += masked_b ? C(0) : Exp(db);
    if (!masked_a && !masked_b) fcross += ea * (da - db);
    if (++steps == kFlushSteps) Flush();
  }

  // The cross term at the lane's maxima, as the CPU core's (KlLanes::Rebase): each term
  // e^(a - max_a) ((a - max_a) - (b - max_b)), exact distances where a - b would round to the
  // logits' magnitude; where the maxima move, the terms so far (flushed into double) move by
  // delta (none yet where it is not finite).
  TF_KLD_HD void Rebase(double delta) {
    if (delta - delta == 0.0) cross += delta * sum_a;
  }

  TF_KLD_HD void Flush() {
    sum_a += static_cast<double>(fsum_a), cross += static_cast<double>(fcross), sum_b += static_cast<double>(fsum_b);
    fsum_a = fcross = fsum_b = C(0);
    steps = 0;
  }

  TF_KLD_HD State ToState() {
    Flush();
    State s;
    s.max_a = u.Stat(max_a), s.sum_a = sum_a, s.cross = cross;
    const double maxima = s.max_a - u.Stat(max_b);  // State's cross: sum e^(a - max_a) (a - b)
    if (maxima - maxima == 0.0) s.cross += maxima * sum_a;
    s.max_b = u.Stat(max_b), s.sum_b = sum_b, s.infinite = infinite;
    return s;
  }
};

TF_KLD_HD double Rescale(double m, double m_new) { return m == m_new ? 1.0 : Exp(m - m_new); }

// x followed by y; commutative in value (sums of two products), so both lanes of a shuffle pair
// get the same bits.
TF_KLD_HD State Merge(const State& x, const State& y) {
  State r;
  r.max_a = x.max_a > y.max_a ? x.max_a : y.max_a;
  r.max_b = x.max_b > y.max_b ? x.max_b : y.max_b;
  const double xa = Rescale(x.max_a, r.max_a), ya = Rescale(y.max_a, r.max_a);
  const double xb = Rescale(x.max_b, r.max_b), yb = Rescale(y.max_b, r.max_b);
  r.sum_a = x.sum_a * xa + y.sum_a * ya;
  r.cross = x.cross * xa + y.cross * ya;
  r.sum_b = x.sum_b * xb + y.sum_b * yb;
  r.infinite = x.infinite | y.infinite;
  return r;
}

// The row's KL and stats[0..4] from its whole-row state (cols > 0), as distill::Finish.
TF_KLD_HD double Finish(const State& s, double* stats) {
  const double log_a = Log(s.sum_a), log_b = Log(s.sum_b);
  double kl;
  if (s.max_a == -INFINITY || s.max_b == -INFINITY || IsNan(s.sum_a) || IsNan(s.sum_b) || IsNan(s.cross)) {
    kl = NAN;
  } else if (s.infinite) {
    kl = INFINITY;
  } else {
    kl = s.cross / s.sum_a - (s.max_a - s.max_b) - (log_a - log_b);
  }
  stats[0] = s.max_a, stats[1] = log_a, stats[2] = s.max_b, stats[3] = log_b;
  return kl;
}

// Exp, Expm1, Log, Log1p above, for distill_jsd.h.
struct Math {
  template <typename C> TF_KLD_HD static C Exp(C x) { return distill::Exp(x); }
  template <typename C> TF_KLD_HD static C Expm1(C x) { return distill::Expm1(x); }
  template <typename C> TF_KLD_HD static C Log(C x) { return distill::Log(x); }
  template <typename C> TF_KLD_HD static C Log1p(C x) { return distill::Log1p(x); }
};

// One element's p, q and log-ratios rp = lp - lm, rq = lq - lm to m = beta p + (1 - beta) q from
// the row's first four stats, as the CPU core's JsdLogs takes them (distill_jsd.h's steps).
template <typename C>
struct Logs {
  Units<C> u;
  C max_a, log_a, max_b, log_b;
  tf_kld::distill::RowShift<C> shift;
  tf_kld::distill::Mixture<C> mix;

  TF_KLD_HD Logs(const double* stats, const Params& params)
      : u(params.temperature), max_a(u.Max(stats[0])), log_a(static_cast<C>(stats[1])), max_b(u.Max(stats[2])),
        log_b(static_cast<C>(stats[3])), shift(tf_kld::distill::RowShiftOf(max_a, max_b, stats[3] - stats[1])),
        mix(tf_kld::distill::MixtureOf<C>(params.beta, params.log_beta, params.log1m_beta,
                                          params.ratio_threshold)) {}

  // a, b as Units::In gives them; returns d = lq - lp.
  TF_KLD_HD C Compute(C a, C b, C* p, C* q, C* rp, C* rq) const {
    const C lp = u.OverT(a - max_a) - log_a, lq = u.OverT(b - max_b) - log_b;
    const C d = tf_kld::distill::LogDistance(a, b, lp, lq, shift, u.temperature, Units<C>::kRaw && u.scaled);
    tf_kld::distill::JsdElement<Math>(lp, lq, d, mix, p, q, rp, rq);
    return d;
  }
};

// Adds one element's second-pass terms to the (compute-type) sums, kJsdSums of them.
template <typename C>
TF_KLD_HD void JsdTerms(const Logs<C>& logs, const tf_kld::distill::Series<C>& series, C a, C b, C* sums) {
  C p, q, rp, rq;
  const C d = logs.Compute(a, b, &p, &q, &rp, &rq);
  tf_kld::distill::AddJsdTerms(a == C(-INFINITY), b == C(-INFINITY), p, q, rp, rq, d, logs.mix, series, sums);
}

// The gradients of element i of a row (stats: that row's), as the CPU core: KL
// d_pred = g/T (q - p), d_true = g/T p ((lp - lq) - KL) (0 where p = 0); JSD
// d_true = g beta/T p ((lp - lm) - KL(p || m)), d_pred = g (1 - beta)/T q ((lq - lm) - KL(q || m)).
template <typename T>
TF_KLD_HD void GradientElement(const Params& params, typename Traits<T>::Compute g_over_t, const double* stats,
                               T t, T p, T* d_true, T* d_pred) {
  using Tr = Traits<T>;
  using C = typename Tr::Compute;
  const Units<C> u(params.temperature);
  const C a = u.In(t), b = u.In(p);
  C vt, vp;
  if (!params.jsd) {
    const C lp = u.OverT(a - u.Max(stats[0])) - static_cast<C>(stats[1]);
    const C lq = u.OverT(b - u.Max(stats[2])) - static_cast<C>(stats[3]);
    const C pe = Exp(lp), qe = Exp(lq);
    vp = g_over_t * (qe - pe);
    vt = a == C(-INFINITY) ? C(0) : g_over_t * (pe * ((lp - lq) - static_cast<C>(stats[4])));
  } else {
    const Logs<C> logs(stats, params);
    C pe, qe, rp, rq;
    logs.Compute(a, b, &pe, &qe, &rp, &rq);
    const C gp = g_over_t * static_cast<C>(params.beta), gq = g_over_t * static_cast<C>(1.0 - params.beta);
    vt = a == C(-INFINITY) ? C(0) : gp * (pe * (rp - static_cast<C>(stats[4])));
    vp = b == C(-INFINITY) ? C(0) : gq * (qe * (rq - static_cast<C>(stats[5])));
  }
  if (d_true != nullptr) *d_true = Tr::FromCompute(vt);
  if (d_pred != nullptr) *d_pred = Tr::FromCompute(vp);
}

// How a forward launch tiles the rows; a function of the shape only.
struct Plan {
  int group = 1;      // threads per row: 1..32 (part of a warp), or == block
  int block = kRowBlock;
  int64_t blocks = 1;
};

inline Plan PlanRows(int64_t rows, int64_t cols) {
  Plan plan;
  if (cols <= kWarpRowCols) {
    while (plan.group < 32 && plan.group < cols) plan.group *= 2;
    const int64_t per_block = plan.block / plan.group;
    plan.blocks = CeilDiv(rows, per_block);
  } else {
    plan.block = cols >= 16 * 512 ? 512 : cols >= 16 * 256 ? 256 : 128;
    plan.group = plan.block;
    plan.blocks = rows;
  }
  plan.blocks = plan.blocks < 1 ? 1 : plan.blocks > kMaxBlocks ? kMaxBlocks : plan.blocks;
  return plan;
}

// Thread `lane`'s first-pass state over a row of n elements.
template <typename T>
TF_KLD_HD Lane<typename Traits<T>::Compute> RowLane(const T* t, const T* p, int64_t n, int lane, int lanes,
                                                    const Params& params) {
  using C = typename Traits<T>::Compute;
  Lane<C> s;
  s.u = Units<C>(params.temperature);
  for (int64_t i = lane; i < n; i += lanes) s.Step(s.u.In(t[i]), s.u.In(p[i]));
  return s;
}

// Thread `lane`'s second-pass sums (kJsdSums) over a row of n elements (stats: the row's first four).
template <typename T>
TF_KLD_HD void RowJsdSums(const T* t, const T* p, int64_t n, int lane, int lanes, const Params& params,
                          const double* stats, double* sums) {
  using C = typename Traits<T>::Compute;
  constexpr int kSums = tf_kld::distill::kJsdSums;
  const Logs<C> logs(stats, params);
  const tf_kld::distill::Series<C> series = tf_kld::distill::SeriesOf<C>(params.beta, params.series);
  C f[kSums] = {};  // flushed into the double sums every kFlushSteps terms, as Lane's
  int steps = 0;
  for (int64_t i = lane; i < n; i += lanes) {
    JsdTerms(logs, series, logs.u.In(t[i]), logs.u.In(p[i]), f);
    if (++steps == kFlushSteps) {
      for (int k = 0; k < kSums; ++k) sums[k] += static_cast<double>(f[k]), f[k] = C(0);
      steps = 0;
    }
  }
  for (int k = 0; k < kSums; ++k) sums[k] += static_cast<double>(f[k]);
}

#ifdef __CUDACC__

__device__ __forceinline__ State Shuffle(const State& s, int offset, int width) {
  State r;
  r.max_a = __shfl_xor_sync(0xffffffffu, s.max_a, offset, width);
  r.sum_a = __shfl_xor_sync(0xffffffffu, s.sum_a, offset, width);
  r.cross = __shfl_xor_sync(0xffffffffu, s.cross, offset, width);
  r.max_b = __shfl_xor_sync(0xffffffffu, s.max_b, offset, width);
  r.sum_b = __shfl_xor_sync(0xffffffffu, s.sum_b, offset, width);
  r.infinite = __shfl_xor_sync(0xffffffffu, s.infinite, offset, width);
  return r;
}

// Butterfly over each aligned group of `width` lanes: every lane gets the group's state, the lower
// lane's half first (the harness replays this tree).
__device__ __forceinline__ State GroupMerge(State s, int width) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int offset = 1; offset < width; offset *= 2) {
    const State other = Shuffle(s, offset, width);
    s = (lane & offset) ? Merge(other, s) : Merge(s, other);
  }
  return s;
}

__device__ __forceinline__ double GroupSumOrdered(double v, int width) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int offset = 1; offset < width; offset *= 2) {
    const double other = __shfl_xor_sync(0xffffffffu, v, offset, width);
    v = (lane & offset) ? other + v : v + other;
  }
  return v;
}

// The block's state, in every thread: warps' states, then warp 0 merges them in warp order.
__device__ __forceinline__ State BlockMerge(State s, State* shared) {
  s = GroupMerge(s, 32);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < warps ? shared[lane] : State();
    s = GroupMerge(s, 32);
    if (lane == 0) shared[32] = s;
  }
  __syncthreads();
  s = shared[32];
  __syncthreads();  // shared is reused by the next row
  return s;
}

__device__ __forceinline__ double BlockSumOrdered(double v, double* shared) {
  v = GroupSumOrdered(v, 32);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : 0.0;
    v = GroupSumOrdered(v, 32);
    if (lane == 0) shared[32] = v;
  }
  __syncthreads();
  v = shared[32];
  __syncthreads();
  return v;
}

// loss[rows] and stats[rows, kStats or kJsdStats] of [rows, cols] logits, cols > 0.
template <typename T>
__global__ void __launch_bounds__(kMaxBlock)
    ForwardKernel(const T* __restrict__ t, const T* __restrict__ p, T* __restrict__ loss,
                  double* __restrict__ stats, int64_t rows, int64_t cols, int group, Params params) {
  // Raw storage: a __shared__ State array would need a dynamic initialiser (State's defaults).
  static_assert(sizeof(State) % sizeof(double) == 0, "State is stored as doubles");
  __shared__ double state_words[33 * sizeof(State) / sizeof(double)];
  __shared__ double sums[33];
  State* states = reinterpret_cast<State*>(state_words);
  const bool in_warp = group <= 32;
  const int per_block = in_warp ? static_cast<int>(blockDim.x) / group : 1;
  const int slot = in_warp ? static_cast<int>(threadIdx.x) / group : 0;
  const int lane = in_warp ? static_cast<int>(threadIdx.x) % group : static_cast<int>(threadIdx.x);
  const int lanes = in_warp ? group : static_cast<int>(blockDim.x);
  const int width = params.jsd ? kJsdStats : kStats;
  // The loop bound is uniform over the block, so every lane reaches the shuffles and barriers.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * per_block; base < rows;
       base += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t row = base + slot;
    const bool live = row < rows;
    const T* tr = t + (live ? row : 0) * cols;
    const T* pr = p + (live ? row : 0) * cols;
    State s = live ? RowLane(tr, pr, cols, lane, lanes, params).ToState() : State();
    s = in_warp ? GroupMerge(s, group) : BlockMerge(s, states);
    double st[kJsdStats];
    double result = Finish(s, st);
    if (params.jsd) {
      double js[tf_kld::distill::kJsdSums] = {};
      if (live) RowJsdSums(tr, pr, cols, lane, lanes, params, st, js);
      for (int k = 0; k < tf_kld::distill::kJsdSums; ++k) {
        js[k] = in_warp ? GroupSumOrdered(js[k], group) : BlockSumOrdered(js[k], sums);
      }
      result = tf_kld::distill::FinishJsd(js, st);
    } else {
      st[4] = result;
    }
    if (live && lane == 0) {
      loss[row] = Traits<T>::FromSum(result);
      for (int j = 0; j < width; ++j) stats[row * width + j] = st[j];
    }
  }
}

// An empty last axis: loss 0 and stats 0 (an empty sum), as the CPU kernels.
template <typename T>
__global__ void EmptyRowsKernel(T* __restrict__ loss, double* __restrict__ stats, int64_t rows, int width) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * width;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    stats[i] = 0.0;
    if (i < rows) loss[i] = Traits<T>::FromSum(0.0);
  }
}

// d_true and/or d_pred (nullptr: not wanted) over the flat [rows * cols] elements, one element a
// thread per step; row = i / cols by a Divider. Outputs may alias the inputs (each element is read
// before its gradient is written, by the same thread).
template <typename T>
__global__ void __launch_bounds__(kRowBlock)
    GradientKernel(const T* g, const T* t, const T* p, const double* __restrict__ stats, T* d_true, T* d_pred,
                   int64_t total, Divider row_of, Params params) {
  using C = typename Traits<T>::Compute;
  const int width = params.jsd ? kJsdStats : kStats;
  const C temperature = static_cast<C>(params.temperature);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = static_cast<int64_t>(row_of.Div(static_cast<uint64_t>(i)));
    const C g_over_t = Traits<T>::ToCompute(g[row]) / temperature;
    GradientElement<T>(params, g_over_t, stats + row * width, t[i], p[i], d_true ? d_true + i : nullptr,
                       d_pred ? d_pred + i : nullptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Host launchers. T: float, double, __half or __nv_bfloat16. Errors: the launch's own cudaError_t.

// loss[rows] and stats[rows * (params.jsd ? kJsdStats : kStats)] of [rows, cols] logits.
template <typename T>
cudaError_t LaunchForward(cudaStream_t stream, const Params& params, const T* t, const T* p, T* loss,
                          double* stats, int64_t rows, int64_t cols) {
  if (rows <= 0) return cudaSuccess;
  const int width = params.jsd ? kJsdStats : kStats;
  if (cols <= 0) {
    const int64_t blocks = CeilDiv(rows * width, 256) < kMaxBlocks ? CeilDiv(rows * width, 256) : kMaxBlocks;
    return Launch(EmptyRowsKernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(256), stream, loss, stats, rows,
                  width);
  }
  const Plan plan = PlanRows(rows, cols);
  return Launch(ForwardKernel<T>, dim3(static_cast<unsigned>(plan.blocks)), dim3(static_cast<unsigned>(plan.block)),
                stream, t, p, loss, stats, rows, cols, plan.group, params);
}

// d_true and/or d_pred (nullptr: not computed) of [rows, cols] logits from the forward's stats.
template <typename T>
cudaError_t LaunchGradient(cudaStream_t stream, const Params& params, const T* g, const T* t, const T* p,
                           const double* stats, T* d_true, T* d_pred, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0 || (d_true == nullptr && d_pred == nullptr)) return cudaSuccess;
  const int64_t total = rows * cols;
  const int64_t blocks = CeilDiv(total, kRowBlock) < kMaxBlocks ? CeilDiv(total, kRowBlock) : kMaxBlocks;
  return Launch(GradientKernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kRowBlock), stream, g, t, p, stats,
                d_true, d_pred, total, Divider(static_cast<uint64_t>(cols)), params);
}

#endif  // __CUDACC__

}  // namespace distill
}  // namespace gpu
}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_DISTILL_GPU_CU_H_
