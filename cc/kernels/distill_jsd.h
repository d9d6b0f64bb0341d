// The generalized JSD's arithmetic of one element (a class of a row) in scalar form: the CPU
// core's float64 kernels (distill_cpu_impl.h) and the CUDA core (distill_gpu.cu.h, float and
// double, on the device and in the harness's CPU replay) take it from here. No TensorFlow, no CUDA
// needed. The CPU core's SIMD JsdLogs and the XLA lowering take the same steps in their own
// arithmetic.
//
// d = lq - lp, computed to ulps of itself from the logits' difference and the rows' statistics,
// ((b - a) - (max_b - max_a)) / T - (log sum_b - log sum_a) (LogitDistance), not as a difference
// of lq and lp, which carry ulps of |lp|.
//
// The log-ratios to the mixture m = beta p + (1 - beta) q, straight from d:
//   rp = lp - lm = -log1p((1 - beta) expm1(d)),   rq = lq - lm = -log1p(beta expm1(-d)).
// One is computed (one log), the one of smaller magnitude: rq where d >= RatioThreshold(beta), else
// rp; the other is it plus or minus d (rq = rp + d), which adds at most half an ulp of the larger.
// log1p(s) is taken as log(u), u = 1 + s computed as a sum of positive terms, where u is below 1/2.
// d not finite (masked classes): -log(beta) or -log(1 - beta) on the finite side, -inf or NaN on
// the other (whose terms are 0). beta below kRatioMinBeta (not a normal float, nor then 1 + s): lm
// by log-sum-exp (-inf where p = q = 0).
//
// The sums, per row: KL(p || m) = sum p rp and KL(q || m) = sum q rq as the gradient reads them
// (consistent with its own p and rp: the gradient sum(p (rp - KL)) is 0 to rounding), and the JSD
// itself as a sum of terms that cancel nothing, for the loss. A class's term beta p rp +
// (1 - beta) q rq is p J(d), J(d) = (1 - beta) d e^d - u log u with u = beta + (1 - beta) e^d; J
// and J' vanish at d = 0 and J at beta = 0 and 1, so J(d) = beta (1 - beta) d^2 K(d). Where p and
// q are close the JSD is O(d^2) while p rp is O(d): a sum of the p rp carries the rounding of each
// O(d) product into the O(d^2) result (hundreds of ulps of the JSD at a student's noise of 0.01).
// So where |d| <= kJsdSeriesBound = 1 the term is p beta (1 - beta) d^2 K(d), K by its Taylor
// series in d (JsdSeries, from beta on the host), and beyond it beta p rp + (1 - beta) q rq, whose
// parts cancel at most about 3x. reference.py's composite takes the same terms and coefficients.
#ifndef TF_KLD_CC_KERNELS_DISTILL_JSD_H_
#define TF_KLD_CC_KERNELS_DISTILL_JSD_H_

#include <cmath>

#if defined(__CUDACC__) || defined(__CUDA__)
#define TF_KLD_JSD_FN __host__ __device__ __forceinline__
#else
#define TF_KLD_JSD_FN inline __attribute__((always_inline))
#endif

namespace tf_kld {
namespace distill {

constexpr float kRatioBound = 64.0f;
constexpr double kRatioMinBeta = 0x1p-125;
// A row's second-pass sums: [sum p rp, sum q rq, the JSD].
constexpr int kJsdSums = 3;
// K's Taylor coefficients taken: double (and the host's table), float. With |d| <= kJsdSeriesBound
// the rest is below half an ulp of K for every beta (u's zeros are at least pi away from 0).
constexpr double kJsdSeriesBound = 1.0;
constexpr int kJsdSeries = 28;
constexpr int kJsdSeriesFloat = 12;

// beta and its logs in the compute type C; tiny: beta < kRatioMinBeta.
template <typename C>
struct Mixture {
  C beta, one_minus_beta, log_beta, log1m_beta;  // log(beta), log1p(-beta)
  C theta;                                       // RatioThreshold(beta)
  bool tiny;
};

namespace {  // internal linkage: the CPU ISA objects each keep their own copy

// Where the log-ratio computed turns from rp's to rq's: d = 2 log(beta / (1 - beta)), where
// |rp| = |rq|, clamped to +-kRatioBound so that the exp in either side's u, e^d or e^-d, stays below
// e^kRatioBound. 0 at beta = 1/2.
inline double RatioThreshold(double beta) {
  const double theta = 2.0 * std::log(beta / (1.0 - beta));
  return theta < -kRatioBound ? -kRatioBound : theta > kRatioBound ? kRatioBound : theta;
}

// K's coefficients of d^0 .. d^(kJsdSeries - 1) at beta (0 < beta < 1), from the Taylor
// series of t(d) = rq'(d) = beta e^-d / u, whose t' = -t (1 - t): with tau = t / beta,
// (n + 1) tau_(n+1) = beta sum_(i+j=n) tau_i tau_j - tau_n, tau_0 = 1; rq = beta sum tau_n
// d^(n+1) / (n + 1), J' = (1 - beta) e^d rq, J(0) = 0. Nothing divides by beta or 1 - beta, so
// the coefficients are as exact at beta = 1e-30 as at 1/2 (within half a float64 ulp of K at
// |d| = 1 against exact rational arithmetic).
inline void JsdSeries(double beta, double* k) {
  constexpr int n = kJsdSeries + 1;
  double tau[n + 1], rq[n + 2], e = 1.0;
  tau[0] = 1.0;
  for (int m = 0; m < n; ++m) {
    double s = 0.0;
    for (int i = 0; i <= m; ++i) s += tau[i] * tau[m - i];
    tau[m + 1] = (beta * s - tau[m]) / (m + 1);
  }
  rq[0] = 0.0;
  for (int i = 1; i <= n + 1; ++i) rq[i] = tau[i - 1] / i;
  // P_m = sum_(j <= m) rq_(m - j) / j! (e^d rq), K_j = P_(j+1) / (j + 2).
  double inv_factorial[n + 1];
  for (int j = 0; j <= n; ++j) inv_factorial[j] = e, e /= (j + 1);
  for (int j = 0; j < kJsdSeries; ++j) {
    double p = 0.0;
    for (int i = 0; i <= j + 1; ++i) p += inv_factorial[i] * rq[j + 1 - i];
    k[j] = p / (j + 2);
  }
}

template <typename C>
TF_KLD_JSD_FN Mixture<C> MixtureOf(double beta, double log_beta, double log1m_beta, double theta) {
  return {static_cast<C>(beta), static_cast<C>(1.0 - beta), static_cast<C>(log_beta),
          static_cast<C>(log1m_beta), static_cast<C>(theta), !(beta >= kRatioMinBeta)};
}

// TwoSum's error of x - y: x - y = fl(x - y) + DifferenceError(x, y) exactly (no overflow).
template <typename C>
TF_KLD_JSD_FN C DifferenceError(C x, C y) {
  const C s = x - y, bb = s - x, ap = s - bb;
  return (x - ap) - (y + bb);
}

// (b - a) - (mh + ml), mh + ml = max_b - max_a exactly, to an ulp of the result wherever b - a is
// near mh: b - a is its rounded value plus DifferenceError, whose difference to mh is exact there
// (logits offset by 1e4 cancel so). Finite a, b (masked classes take lq - lp). Never built with
// reassociating arithmetic.
template <typename C>
TF_KLD_JSD_FN C LogitDistance(C a, C b, C mh, C ml) {
  return (((b - a) - mh) + DifferenceError(b, a)) - ml;
}

// A row's constants for d: max_b - max_a as mh + ml exactly (C maxima), log sum_b - log sum_a
// (float64) as log_hi + log_lo in C.
template <typename C>
struct RowShift {
  C mh, ml, log_hi, log_lo;
};

template <typename C>
TF_KLD_JSD_FN RowShift<C> RowShiftOf(C max_a, C max_b, double log_ba) {
  const C hi = static_cast<C>(log_ba);
  return {max_b - max_a, DifferenceError(max_b, max_a), hi, static_cast<C>(log_ba - static_cast<double>(hi))};
}

// d = lq - lp of one element: a, b are the logits in the units of the row's maxima, and a distance
// of them is divided by t where `divide` (raw float logits; float64 ones come divided already).
// Masked classes (a or b -inf) take lq - lp: +-inf, or NaN where both are.
template <typename C>
TF_KLD_JSD_FN C LogDistance(C a, C b, C lp, C lq, const RowShift<C>& s, C t, bool divide) {
  if (a == C(-INFINITY) || b == C(-INFINITY)) return lq - lp;
  const C x = LogitDistance(a, b, s.mh, s.ml);
  return ((divide ? x / t : x) - s.log_hi) - s.log_lo;
}

// The row's JSD from its second-pass sums (kJsdSums); stats[4], stats[5] get the gradient's two
// (stats[0..4): the row's first-pass stats).
TF_KLD_JSD_FN double FinishJsd(const double* sums, double* stats) {
  stats[4] = sums[0], stats[5] = sums[1];
  if (stats[0] == -INFINITY || stats[2] == -INFINITY) return NAN;
  return sums[2];
}

// -log1p(s), s = u - 1, as -log(u) where u is below 1/2.
template <typename M, typename C>
TF_KLD_JSD_FN C NegLog1p(C u, C s) {
  return -(u < C(0.5) ? M::Log(u) : M::Log1p(s));
}

// One element: p, q (the larger as exp of its log, the other as it times e^-|d|, so that an error
// of both logs scales both alike) and rp, rq. M: static Exp, Expm1, Log, Log1p of C.
template <typename M, typename C>
TF_KLD_JSD_FN void JsdElement(C lp, C lq, C d, const Mixture<C>& mix, C* p, C* q, C* rp, C* rq) {
  const bool up = d > C(0);  // q > p
  const C ad = up ? d : -d;
  const C top = M::Exp(up ? lq : lp), e = M::Exp(-ad);
  *p = up ? top * e : top, *q = up ? top : top * e;
  if (mix.tiny) {
    const C minus_inf = C(-INFINITY);
    const C x1 = lp + mix.log_beta, x2 = lq + mix.log1m_beta;
    const C hi = x1 >= x2 ? x1 : x2, lo = x1 >= x2 ? x2 : x1;
    const C lm = x1 == minus_inf && x2 == minus_inf ? minus_inf : hi + M::Log1p(M::Exp(lo - hi));
    *rp = lp - lm, *rq = lq - lm;
    return;
  }
  const bool q_side = d >= mix.theta;  // rq computed, rp = rq - d
  const C z = q_side ? -d : d;         // below kRatioBound
  const C x = q_side ? mix.one_minus_beta : mix.beta, y = q_side ? mix.beta : mix.one_minus_beta;
  const C ez = z > C(0) ? M::Exp(z) : e;  // e^-|d| unless z = |d|
  const C r = NegLog1p<M>(x + y * ez, y * M::Expm1(z));
  *rp = q_side ? r - d : r, *rq = q_side ? r : r + d;
}

// The loss's series (JsdSeries) in the compute type C: beta (1 - beta) and K's coefficients, the
// first kJsdSeriesFloat for float.
template <typename C>
struct Series {
  static constexpr int kTerms = sizeof(C) > sizeof(float) ? kJsdSeries : kJsdSeriesFloat;
  C scale, k[kTerms];
};

template <typename C>
TF_KLD_JSD_FN Series<C> SeriesOf(double beta, const double* k) {
  Series<C> s;
  s.scale = static_cast<C>(beta * (1.0 - beta));
  for (int j = 0; j < Series<C>::kTerms; ++j) s.k[j] = static_cast<C>(k[j]);
  return s;
}

// One class's JSD term from d and its parts p rp, q rq (0 where that side is masked; d is then
// not finite): p beta (1 - beta) d^2 K(d) where |d| <= kJsdSeriesBound, else beta p rp +
// (1 - beta) q rq.
template <typename C>
TF_KLD_JSD_FN C JsdTerm(C p, C d, C prp, C qrq, const Mixture<C>& mix, const Series<C>& series) {
  const C bound = C(kJsdSeriesBound);
  if (!(d <= bound && d >= -bound)) return mix.beta * prp + mix.one_minus_beta * qrq;
  C k = series.k[Series<C>::kTerms - 1];
  for (int j = Series<C>::kTerms - 2; j >= 0; --j) k = k * d + series.k[j];
  return p * (series.scale * ((d * d) * k));
}

// Adds one element's terms to its row's sums (kJsdSums, C): p rp, q rq (0 for a masked class,
// logit -inf) and the JSD's term (0 where both are masked).
template <typename C>
TF_KLD_JSD_FN void AddJsdTerms(bool masked_a, bool masked_b, C p, C q, C rp, C rq, C d, const Mixture<C>& mix,
                               const Series<C>& series, C* sums) {
  const C prp = masked_a ? C(0) : p * rp, qrq = masked_b ? C(0) : q * rq;
  sums[0] += prp;
  sums[1] += qrq;
  sums[2] += JsdTerm(p, d, prp, qrq, mix, series);
}

}  // namespace
}  // namespace distill
}  // namespace tf_kld

#undef TF_KLD_JSD_FN

#endif  // TF_KLD_CC_KERNELS_DISTILL_JSD_H_
